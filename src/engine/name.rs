//! [`Name`]: an image name the engine holds, shared rather than copied.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An image name as the engine keeps it: one allocation, shared by the intent, the key it is
/// found by and every set that names it (a clone is a reference count, not a copy). Measured
/// with `tests/footprint.rs`: an intent held its name twice (the map's key and its own field),
/// 56 bytes and an allocation more per intent than this.
///
/// It reads as a `&str` (`Deref`, `Borrow<str>`: maps keyed by it are searched with a `&str`),
/// orders and compares as its text, and is written and read by serde as a string.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(Arc<str>);

impl Name {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Name {
        Name(Arc::from(s))
    }
}

impl From<String> for Name {
    fn from(s: String) -> Name {
        Name(Arc::from(s))
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0.to_string()
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Name> for str {
    fn eq(&self, other: &Name) -> bool {
        self == &*other.0
    }
}

impl PartialEq<Name> for &str {
    fn eq(&self, other: &Name) -> bool {
        *self == &*other.0
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        **self == *other.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Name, D::Error> {
        // A `String` first, not a borrowed `&str`: an escaped name in JSON cannot be borrowed.
        String::deserialize(d).map(Name::from)
    }
}

#[cfg(test)]
mod tests {
    use super::Name;
    use std::collections::BTreeMap;

    #[test]
    fn a_name_is_found_by_its_text_and_reads_back_as_written() {
        let mut map = BTreeMap::new();
        map.insert(Name::from("b"), 2);
        map.insert(Name::from("a\u{1}\"é"), 1);
        assert_eq!(map.get("a\u{1}\"é"), Some(&1));
        assert_eq!(map.keys().next().unwrap(), "a\u{1}\"é");
        let json = serde_json::to_string(&Name::from("a\u{1}\"é")).unwrap();
        assert_eq!(json, serde_json::to_string("a\u{1}\"é").unwrap());
        let back: Name = serde_json::from_str(&json).unwrap();
        assert_eq!(back, "a\u{1}\"é");
        let shared = back.clone();
        assert!(std::ptr::eq(shared.as_ptr(), back.as_ptr()));
    }
}
