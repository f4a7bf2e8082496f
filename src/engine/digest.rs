//! [`Digest`]: an image's target digest as the engine keeps it, 32 bytes rather than a string.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SHA256: &str = "sha256:";

/// A target digest. `sha256:` followed by 64 lowercase hex digits (every digest containerd
/// writes today) is held as its 32 bytes, in the intent itself; anything else is kept as the
/// text it was, so every digest reads back exactly as written. Measured with
/// `tests/footprint.rs`: the string form cost 71 bytes of heap and an allocation per intent.
///
/// Shown, stored (serde) and compared with containerd's text as `sha256:<hex>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Digest {
    /// `sha256:<64 lowercase hex digits>`, as bytes.
    Sha256([u8; 32]),
    /// Any other text, as it was.
    Other(Box<str>),
}

impl Digest {
    /// Reads `text`: never fails, a digest of another form is kept as text.
    pub fn new(text: &str) -> Digest {
        text.strip_prefix(SHA256)
            .and_then(sha256)
            .map_or_else(|| Digest::Other(text.into()), Digest::Sha256)
    }

    /// Whether this is the digest `text` spells (compared without building a string).
    pub fn is(&self, text: &str) -> bool {
        match self {
            Digest::Sha256(bytes) => text
                .strip_prefix(SHA256)
                .and_then(sha256)
                .is_some_and(|b| &b == bytes),
            Digest::Other(s) => **s == *text,
        }
    }
}

/// The 32 bytes of 64 lowercase hex digits; `None` for anything else (upper case included,
/// which would not be written back as it was read).
fn sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

impl From<&str> for Digest {
    fn from(s: &str) -> Digest {
        Digest::new(s)
    }
}

impl From<String> for Digest {
    fn from(s: String) -> Digest {
        Digest::new(&s)
    }
}

impl PartialEq<str> for Digest {
    fn eq(&self, other: &str) -> bool {
        self.is(other)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Digest::Sha256(bytes) => {
                f.write_str(SHA256)?;
                for b in bytes {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
            Digest::Other(s) => f.write_str(s),
        }
    }
}

/// As its text's `Debug` (quoted and escaped), as a `String` digest was shown.
impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Digest::Sha256(_) => write!(f, "\"{self}\""),
            Digest::Other(s) => fmt::Debug::fmt(s, f),
        }
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        String::deserialize(d).map(Digest::from)
    }
}

#[cfg(test)]
mod tests {
    use super::Digest;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn every_digest_reads_back_as_it_was_written() {
        let odd = [
            "sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
            "sha256:0123",
            "sha512:00",
            "",
            "sha256:\"\n",
            "sha256:é123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde",
        ];
        assert!(matches!(Digest::new(D), Digest::Sha256(_)));
        for text in std::iter::once(D).chain(odd) {
            let d = Digest::new(text);
            assert_eq!(d.to_string(), text);
            assert!(d.is(text) && d == *text);
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, serde_json::to_string(text).unwrap());
            assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
            assert_eq!(format!("{d:?}"), format!("{text:?}"));
        }
        for text in odd {
            assert!(matches!(Digest::new(text), Digest::Other(_)), "{text}");
            assert!(!Digest::new(D).is(text) && !Digest::new(text).is(D));
        }
    }
}
