//! How pinkeeper shows bytes it did not choose: file names of the images directory (any bytes
//! but `/` and NUL, not necessarily UTF-8) and anything else that reaches a log line, a table
//! or a JSON string.
//!
//! Owns the one escaping rule, so a name reads the same in `inventory`, `list`, the logs and
//! JSON: printable UTF-8 is shown as it is; a backslash is doubled; `\n`, `\r`, `\t` and every
//! other control character (C0, DEL, C1) are shown as `\n`, `\r`, `\t` or `\xNN` (`\u{NNNN}`
//! for C1 and the Unicode line and paragraph separators); a byte that is not part of valid
//! UTF-8 is shown as `\xNN`. The result is one line that cannot forge another, and from which
//! the original bytes can be read back. It must not touch storage: the ledger keeps the bytes
//! themselves ([`crate::escape::path_bytes`] is its lossless encoding).

use std::fmt::{self, Write as _};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A path shown escaped: `format!("{}", escape::path(p))`.
pub(crate) fn path(path: &Path) -> Escaped<'_> {
    Escaped(path.as_os_str().as_bytes())
}

/// Any bytes shown escaped.
pub(crate) fn bytes(bytes: &[u8]) -> Escaped<'_> {
    Escaped(bytes)
}

/// A string shown escaped (control characters only: it is valid UTF-8 already).
pub(crate) fn text(text: &str) -> Escaped<'_> {
    Escaped(text.as_bytes())
}

/// Bytes that display escaped (see the module's comment).
#[derive(Clone, Copy)]
pub(crate) struct Escaped<'a>(&'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                match c {
                    '\\' => f.write_str("\\\\")?,
                    '\n' => f.write_str("\\n")?,
                    '\r' => f.write_str("\\r")?,
                    '\t' => f.write_str("\\t")?,
                    c if (c as u32) < 0x20 || c as u32 == 0x7f => write!(f, "\\x{:02x}", c as u32)?,
                    c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                        write!(f, "\\u{{{:04x}}}", c as u32)?
                    }
                    c => f.write_char(c)?,
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// The lossless serde form of a path for the ledger's JSON records: a string when the path is
/// valid UTF-8 (as every earlier ledger has it), else `{"bytes": [..]}`. Use with
/// `#[serde(with = "crate::escape::path_bytes")]` on a `PathBuf`.
pub(crate) mod path_bytes {
    use std::ffi::OsString;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::path::{Path, PathBuf};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Form<'a> {
        Text(std::borrow::Cow<'a, str>),
        Bytes { bytes: Vec<u8> },
    }

    /// Serializes `path` losslessly.
    pub(crate) fn serialize<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
        match path.to_str() {
            Some(text) => Form::Text(text.into()).serialize(s),
            None => Form::Bytes {
                bytes: path.as_os_str().as_bytes().to_vec(),
            }
            .serialize(s),
        }
    }

    /// Reads either form back.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        Ok(match Form::deserialize(d)? {
            Form::Text(text) => PathBuf::from(text.into_owned()),
            Form::Bytes { bytes } => PathBuf::from(OsString::from_vec(bytes)),
        })
    }

    /// The same for an `Option<PathBuf>`: `#[serde(with = "crate::escape::path_bytes::option")]`.
    pub(crate) mod option {
        use std::path::PathBuf;

        use serde::{Deserialize, Deserializer, Serializer};

        /// Serializes `path` losslessly, `None` as `null`.
        pub(crate) fn serialize<S: Serializer>(
            path: &Option<PathBuf>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match path {
                Some(p) => super::serialize(p, s),
                None => s.serialize_none(),
            }
        }

        /// Reads either form, or `null`, back.
        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<PathBuf>, D::Error> {
            #[derive(Deserialize)]
            struct Wrapped(#[serde(with = "super")] PathBuf);
            Ok(Option::<Wrapped>::deserialize(d)?.map(|w| w.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn printable_text_is_unchanged_and_the_rest_is_escaped() {
        assert_eq!(
            text("docker.io/library/app:1").to_string(),
            "docker.io/library/app:1"
        );
        assert_eq!(text("café").to_string(), "café");
        assert_eq!(text("a\nINFO forged").to_string(), "a\\nINFO forged");
        assert_eq!(text("a\\nb").to_string(), "a\\\\nb");
        assert_eq!(text("\t\r\x1b[31m\x7f").to_string(), "\\t\\r\\x1b[31m\\x7f");
        assert_eq!(text("\u{85}\u{2028}").to_string(), "\\u{0085}\\u{2028}");
        assert_eq!(bytes(b"caf\xe9.tar").to_string(), "caf\\xe9.tar");
        let latin1 = PathBuf::from(OsStr::from_bytes(b"/images/caf\xe9.tar"));
        assert_eq!(path(&latin1).to_string(), "/images/caf\\xe9.tar");
    }

    #[test]
    fn paths_round_trip_through_json_whatever_their_bytes() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Record {
            #[serde(with = "path_bytes")]
            path: PathBuf,
            #[serde(with = "path_bytes::option", default)]
            source: Option<PathBuf>,
        }
        for raw in [
            &b"/images/app.tar"[..],
            b"/images/caf\xe9.tar",
            b"/i/\xff\xfe\n.tar",
        ] {
            let record = Record {
                path: PathBuf::from(OsStr::from_bytes(raw)),
                source: Some(PathBuf::from(OsStr::from_bytes(raw))),
            };
            let json = serde_json::to_string(&record).unwrap();
            assert_eq!(
                serde_json::from_str::<Record>(&json).unwrap(),
                record,
                "{json}"
            );
        }
        // What earlier ledgers wrote reads back unchanged.
        let old: Record =
            serde_json::from_str(r#"{"path":"/images/a.tar","source":null}"#).unwrap();
        assert_eq!(old.path, PathBuf::from("/images/a.tar"));
        assert_eq!(old.source, None);
        let missing: Record = serde_json::from_str(r#"{"path":"/a"}"#).unwrap();
        assert_eq!(missing.source, None);
    }
}
