//! [`Labels`]: a containerd label map, kept as a sorted vector.
//!
//! A record pinkeeper reads carries one or two labels (the daemon keeps only the pin labels,
//! `Containerd::keeping_labels`), and a listing holds one record per image: as a `BTreeMap`,
//! each record's map cost a whole B-tree node (about 540 bytes, however few its entries),
//! which was a third of the heap at a repair's peak with 10,000 images (issue 12). A vector
//! holds exactly its entries; lookups are a binary search over a handful of keys.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A containerd label map: keys unique, kept sorted. Serialized as a JSON object, as a map
/// would be.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    /// No labels.
    pub const fn new() -> Self {
        Labels(Vec::new())
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&String> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    /// Whether `key` is set.
    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Sets `key` to `value`, answering the value it replaced.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    /// Removes `key`, answering its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.find(key).ok().map(|i| self.0.remove(i).1)
    }

    /// Keeps the entries `keep` answers true for.
    pub fn retain(&mut self, mut keep: impl FnMut(&String, &mut String) -> bool) {
        self.0.retain_mut(|(k, v)| keep(k, v));
    }

    /// How many labels.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No labels at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(k, _)| k)
    }

    /// The entries, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// Gives back spare capacity (a record read from containerd is kept as long as it is
    /// listed).
    pub fn shrink_to_fit(&mut self) {
        self.0.shrink_to_fit();
    }
}

impl Extend<(String, String)> for Labels {
    fn extend<I: IntoIterator<Item = (String, String)>>(&mut self, entries: I) {
        for (k, v) in entries {
            self.insert(k, v);
        }
    }
}

impl FromIterator<(String, String)> for Labels {
    /// Later entries win over earlier ones with the same key, as in a map.
    fn from_iter<I: IntoIterator<Item = (String, String)>>(entries: I) -> Self {
        let mut v: Vec<(String, String)> = entries.into_iter().collect();
        // Stable: equal keys keep their order, and the last of each run is kept.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(String, String)> = Vec::with_capacity(v.len());
        for entry in v {
            match out.last_mut() {
                Some(last) if last.0 == entry.0 => *last = entry,
                _ => out.push(entry),
            }
        }
        Labels(out)
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(entries: [(String, String); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl IntoIterator for Labels {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, String)>,
        fn(&'a (String, String)) -> (&'a String, &'a String),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Through a map: a duplicate key keeps its last value, as before.
        let map = std::collections::BTreeMap::<String, String>::deserialize(d)?;
        Ok(Labels(map.into_iter().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> String {
        x.to_string()
    }

    #[test]
    fn behaves_as_a_sorted_map() {
        let mut l: Labels = [(s("b"), s("1")), (s("a"), s("2")), (s("b"), s("3"))]
            .into_iter()
            .collect();
        assert_eq!(l.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(
            l.get("b").map(String::as_str),
            Some("3"),
            "the last value wins"
        );
        assert_eq!(l.insert(s("c"), s("4")), None);
        assert_eq!(l.insert(s("a"), s("5")).as_deref(), Some("2"));
        assert_eq!(l.remove("b").as_deref(), Some("3"));
        assert_eq!(l.remove("b"), None);
        assert!(l.contains_key("c") && !l.contains_key("b"));
        assert_eq!(format!("{l:?}"), r#"{"a": "5", "c": "4"}"#);
        l.retain(|k, _| k != "a");
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn serializes_as_an_object() {
        let l: Labels = [(s("z"), s("1")), (s("a"), s("2"))].into();
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(json, r#"{"a":"2","z":"1"}"#);
        let back: Labels = serde_json::from_str(r#"{"z":"1","a":"2"}"#).unwrap();
        assert_eq!(back, l);
        assert!(serde_json::from_str::<Labels>("[1]").is_err());
    }
}
