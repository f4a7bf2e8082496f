//! Listing a namespace too large for one answer.
//!
//! containerd refuses to send a gRPC message over 16 MiB (`max_send_message_size`; an
//! `Images.List` of about 50,000 records with K3s's labels), and answers `ResourceExhausted`.
//! The namespace is then listed in parts, each a filter on the end of the name
//! (`name~="[0-3]$"`): the characters of a name, read from its end, fall into exactly one of
//! [`CLASSES`] each, so the parts of a split never overlap and together hold every name. A
//! part still too large is split again by the character before: one part per class, plus the
//! names that are exactly that suffix (`^...$`).

/// The classes a character falls into: every character is in exactly one. Go's regexp, which
/// containerd's filters use, reads a name as runes (an invalid byte as U+FFFD), which the last
/// class takes.
pub const CLASSES: [&str; 7] = [
    "[0-3]",
    "[4-7]",
    "[89]",
    "[a-f]",
    "[g-z]",
    "[A-Z]",
    "[^0-9a-zA-Z]",
];

/// Deepest split: 7 parts at each of 6 positions, far beyond what a 16 MiB limit needs.
pub const MAX_DEPTH: usize = 6;

/// One part: names ending in characters of these classes (the last one last), and, when
/// `whole`, nothing before them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    suffix: Vec<usize>,
    whole: bool,
}

impl Part {
    /// The first split: by the last character.
    pub fn first() -> Vec<Part> {
        (0..CLASSES.len())
            .map(|c| Part {
                suffix: vec![c],
                whole: false,
            })
            .collect()
    }

    /// This part split by the character before its suffix, or `None` when it cannot be split
    /// further (too deep, or it holds one name only).
    pub fn split(&self) -> Option<Vec<Part>> {
        if self.whole || self.suffix.len() >= MAX_DEPTH {
            return None;
        }
        let mut parts: Vec<Part> = (0..CLASSES.len())
            .map(|c| {
                let mut suffix = vec![c];
                suffix.extend(&self.suffix);
                Part {
                    suffix,
                    whole: false,
                }
            })
            .collect();
        parts.push(Part {
            suffix: self.suffix.clone(),
            whole: true,
        });
        Some(parts)
    }

    /// containerd's filter for this part.
    pub fn filter(&self) -> String {
        let classes: String = self.suffix.iter().map(|&c| CLASSES[c]).collect();
        let start = if self.whole { "^" } else { "" };
        format!("name~=\"{start}{classes}$\"")
    }

    /// Whether `name` is in this part (what containerd's regexp decides; for the tests).
    pub fn contains(&self, name: &str) -> bool {
        let chars: Vec<char> = name.chars().collect();
        if chars.len() < self.suffix.len() || (self.whole && chars.len() != self.suffix.len()) {
            return false;
        }
        let tail = &chars[chars.len() - self.suffix.len()..];
        tail.iter()
            .zip(&self.suffix)
            .all(|(&ch, &c)| class(ch) == c)
    }
}

/// The index in [`CLASSES`] of a character.
fn class(ch: char) -> usize {
    match ch {
        '0'..='3' => 0,
        '4'..='7' => 1,
        '8' | '9' => 2,
        'a'..='f' => 3,
        'g'..='z' => 4,
        'A'..='Z' => 5,
        _ => 6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Parts split `splits` times, each time the part holding `pick`, as a listing does.
    fn parts_after(splits: &[usize]) -> Vec<Part> {
        let mut parts = Part::first();
        for &pick in splits {
            let i = pick % parts.len();
            if let Some(more) = parts[i].split() {
                parts.remove(i);
                parts.extend(more);
            }
        }
        parts
    }

    proptest! {
        #[test]
        fn every_name_is_in_exactly_one_part(
            names in proptest::collection::vec(any::<String>(), 1..20),
            ascii in proptest::collection::vec("[a-z0-9:/@.\\-]{0,12}", 1..20),
            splits in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let parts = parts_after(&splits);
            for name in names.iter().chain(&ascii).filter(|n| !n.is_empty()) {
                let holding = parts.iter().filter(|p| p.contains(name)).count();
                prop_assert_eq!(holding, 1, "{:?} in {} parts of {:?}", name, holding, parts);
            }
        }
    }

    #[test]
    fn filters_read_as_containerd_expects() {
        assert_eq!(Part::first()[0].filter(), r#"name~="[0-3]$""#);
        let split = Part::first()[6].split().unwrap();
        assert_eq!(split[3].filter(), r#"name~="[a-f][^0-9a-zA-Z]$""#);
        assert_eq!(split[7].filter(), r#"name~="^[^0-9a-zA-Z]$""#);
        assert!(split[7].split().is_none());
    }

    #[test]
    fn a_split_stops_at_the_deepest_position() {
        let mut part = Part::first().remove(0);
        for _ in 1..MAX_DEPTH {
            part = part.split().unwrap().remove(0);
        }
        assert!(part.split().is_none());
    }
}
