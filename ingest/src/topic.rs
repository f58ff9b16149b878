//! MQTT topic names and filters: validation and matching level by level, and the
//! subscription trie the broker routes with.
//!
//! Topics are UTF-8 and may hold any character MQTT allows (`ü/x` is a valid topic); this
//! module never slices a topic by bytes, so no character can make it panic. A publish is
//! matched by walking the trie one level at a time: the cost depends on the topic's depth
//! and the matching filters, not on how many subscriptions exist.

use std::collections::HashMap;

/// Longest topic or filter MQTT can carry (a two-byte length prefix).
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// Why a topic name or filter is not valid MQTT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Empty topic or filter.
    #[error("topic is empty")]
    Empty,
    /// Over [`MAX_TOPIC_BYTES`].
    #[error("topic is {0} bytes; MQTT allows at most 65535")]
    TooLong(usize),
    /// A NUL character, which MQTT forbids in strings.
    #[error("topic contains a NUL character")]
    Nul,
    /// `+` or `#` in a topic a client publishes to.
    #[error("wildcards `+` and `#` are not allowed in a publish topic (`{0}`)")]
    WildcardInPublish(String),
    /// A wildcard that does not stand alone in its level, or `#` before the last level.
    #[error("invalid filter `{0}`: `+` must fill a whole level and `#` must be the whole last level")]
    BadWildcard(String),
}

fn check_common(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(TopicError::TooLong(topic.len()));
    }
    if topic.contains('\0') {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// Checks a topic name a client (or a rule) publishes to.
pub fn validate_topic(topic: &str) -> Result<(), TopicError> {
    check_common(topic)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInPublish(topic.to_owned()));
    }
    Ok(())
}

/// Checks a subscription filter.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let ok = match *level {
            "+" => true,
            "#" => i == levels.len() - 1,
            l => !l.contains(['+', '#']),
        };
        if !ok {
            return Err(TopicError::BadWildcard(filter.to_owned()));
        }
    }
    Ok(())
}

pub use ferrite_engine::plugin::topic_matches as matches;

/// Subscriptions by filter, for routing: values are kept at the node of their filter.
#[derive(Debug)]
pub struct TopicTrie<V> {
    root: Node<V>,
    len: usize,
}

#[derive(Debug)]
struct Node<V> {
    exact: HashMap<String, Node<V>>,
    plus: Option<Box<Node<V>>>,
    /// Values of filters ending in `#` at this level.
    hash: Vec<V>,
    /// Values of filters ending at this level.
    here: Vec<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Self { exact: HashMap::new(), plus: None, hash: Vec::new(), here: Vec::new() }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.plus.is_none() && self.hash.is_empty() && self.here.is_empty()
    }
}

impl<V> Default for TopicTrie<V> {
    fn default() -> Self {
        Self { root: Node::default(), len: 0 }
    }
}

impl<V> TopicTrie<V> {
    /// An empty trie.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of values held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no value is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `value` under `filter` (a valid filter).
    pub fn insert(&mut self, filter: &str, value: V) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            match level {
                "#" => {
                    node.hash.push(value);
                    self.len += 1;
                    return;
                }
                "+" => node = node.plus.get_or_insert_with(Box::default),
                l => node = node.exact.entry(l.to_owned()).or_default(),
            }
        }
        node.here.push(value);
        self.len += 1;
    }

    /// Whether a value under `filter` satisfies `pred`.
    pub fn contains(&self, filter: &str, pred: impl Fn(&V) -> bool) -> bool {
        let mut node = &self.root;
        for level in filter.split('/') {
            node = match level {
                "#" => return node.hash.iter().any(&pred),
                "+" => match &node.plus {
                    Some(n) => n,
                    None => return false,
                },
                l => match node.exact.get(l) {
                    Some(n) => n,
                    None => return false,
                },
            };
        }
        node.here.iter().any(pred)
    }

    /// Removes the values under `filter` for which `pred` holds; returns how many.
    pub fn remove(&mut self, filter: &str, pred: impl Fn(&V) -> bool) -> usize {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_in(&mut self.root, &levels, &pred);
        self.len -= removed;
        removed
    }

    /// Removes every value for which `pred` holds, under any filter; returns how many.
    pub fn retain(&mut self, pred: impl Fn(&V) -> bool) -> usize {
        let removed = retain_in(&mut self.root, &pred);
        self.len -= removed;
        removed
    }

    /// Calls `visit` with every value whose filter matches `topic`. Allocates nothing:
    /// the topic's levels are walked with a cloned iterator per branch.
    pub fn for_each_match<'a>(&'a self, topic: &str, mut visit: impl FnMut(&'a V)) {
        if self.len == 0 {
            return;
        }
        // Wildcards at the first level do not match `$` topics.
        let system = topic.starts_with('$');
        match_in(&self.root, topic.split('/'), system, &mut visit);
    }
}

fn match_in<'a, 't, V>(
    node: &'a Node<V>,
    mut levels: std::str::Split<'t, char>,
    first_is_system: bool,
    visit: &mut impl FnMut(&'a V),
) {
    if !first_is_system {
        node.hash.iter().for_each(&mut *visit);
    }
    let Some(level) = levels.next() else {
        node.here.iter().for_each(visit);
        return;
    };
    if let Some(n) = node.exact.get(level) {
        match_in(n, levels.clone(), false, visit);
    }
    if !first_is_system && let Some(n) = &node.plus {
        match_in(n, levels, false, visit);
    }
}

fn remove_in<V>(node: &mut Node<V>, levels: &[&str], pred: &impl Fn(&V) -> bool) -> usize {
    let Some((level, rest)) = levels.split_first() else {
        let before = node.here.len();
        node.here.retain(|v| !pred(v));
        return before - node.here.len();
    };
    match *level {
        "#" => {
            let before = node.hash.len();
            node.hash.retain(|v| !pred(v));
            before - node.hash.len()
        }
        "+" => {
            let Some(child) = node.plus.as_mut() else { return 0 };
            let n = remove_in(child, rest, pred);
            if child.is_empty() {
                node.plus = None;
            }
            n
        }
        l => {
            let Some(child) = node.exact.get_mut(l) else { return 0 };
            let n = remove_in(child, rest, pred);
            if child.is_empty() {
                node.exact.remove(l);
            }
            n
        }
    }
}

fn retain_in<V>(node: &mut Node<V>, pred: &impl Fn(&V) -> bool) -> usize {
    let before = node.here.len() + node.hash.len();
    node.here.retain(|v| !pred(v));
    node.hash.retain(|v| !pred(v));
    let mut removed = before - node.here.len() - node.hash.len();
    node.exact.retain(|_, child| {
        removed += retain_in(child, pred);
        !child.is_empty()
    });
    if let Some(child) = node.plus.as_mut() {
        removed += retain_in(child, pred);
        if child.is_empty() {
            node.plus = None;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn validation_follows_the_specification() {
        assert!(validate_topic("ü/x").is_ok());
        assert!(validate_topic("devices/é/telemetry").is_ok());
        assert!(validate_topic("/").is_ok(), "empty levels are allowed");
        assert_eq!(validate_topic(""), Err(TopicError::Empty));
        assert!(matches!(validate_topic("a/+"), Err(TopicError::WildcardInPublish(_))));
        assert!(matches!(validate_topic("a/#"), Err(TopicError::WildcardInPublish(_))));
        assert_eq!(validate_topic("a\0b"), Err(TopicError::Nul));
        assert!(matches!(validate_topic(&"x".repeat(70_000)), Err(TopicError::TooLong(70_000))));
        for ok in ["#", "+", "a/+/b", "a/#", "+/+", "ü/+", "/+"] {
            assert!(validate_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["a/#/b", "a+", "a/b#", "#/a", "a/+b"] {
            assert!(validate_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matching_by_levels() {
        assert!(matches("ü/x", "ü/+"));
        assert!(matches("ü/x", "#"));
        assert!(matches("é", "+"));
        assert!(matches("a/b/c", "a/#"));
        assert!(matches("a", "a/#"), "`#` also matches the parent level");
        assert!(!matches("a/b", "a"));
        assert!(!matches("a", "a/+"));
        assert!(matches("a/", "a/+"), "an empty level is a level");
        assert!(!matches("$SYS/x", "#"));
        assert!(!matches("$SYS/x", "+/x"));
        assert!(matches("$SYS/x", "$SYS/#"));
    }

    fn trie_matches(t: &TopicTrie<usize>, topic: &str) -> Vec<usize> {
        let mut v = Vec::new();
        t.for_each_match(topic, |x| v.push(*x));
        v.sort_unstable();
        v
    }

    #[test]
    fn trie_insert_match_and_remove() {
        let mut t = TopicTrie::new();
        for (i, f) in ["#", "ü/+", "a/b", "a/#", "+/b", "$SYS/#"].iter().enumerate() {
            t.insert(f, i);
        }
        assert_eq!(trie_matches(&t, "ü/x"), vec![0, 1]);
        assert_eq!(trie_matches(&t, "a/b"), vec![0, 2, 3, 4]);
        assert_eq!(trie_matches(&t, "$SYS/load"), vec![5]);
        assert_eq!(t.remove("a/#", |v| *v == 3), 1);
        assert_eq!(trie_matches(&t, "a/b"), vec![0, 2, 4]);
        assert_eq!(t.retain(|v| *v == 0), 1);
        assert_eq!(trie_matches(&t, "a/b"), vec![2, 4]);
        assert_eq!(t.len(), 4);
        assert!(t.contains("ü/+", |v| *v == 1));
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("ü".to_owned()),
            Just(String::new()),
            Just("$s".to_owned()),
            "[a-cé]{1,2}"
        ]
    }

    fn filter_level() -> impl Strategy<Value = String> {
        prop_oneof![level(), Just("+".to_owned())]
    }

    proptest! {
        /// The trie finds exactly the filters the plain matcher accepts.
        #[test]
        fn trie_agrees_with_the_matcher(
            filters in prop::collection::vec((prop::collection::vec(filter_level(), 1..4), any::<bool>()), 1..12),
            topic in prop::collection::vec(level(), 1..5),
        ) {
            let filters: Vec<String> = filters
                .into_iter()
                .map(|(levels, hash)| {
                    let mut f = levels.join("/");
                    if hash { f.push_str("/#"); }
                    f
                })
                .collect();
            let topic = topic.join("/");
            let mut t = TopicTrie::new();
            // An empty filter is invalid (and refused at SUBSCRIBE): not a case for the trie.
            prop_assume!(filters.iter().all(|f| !f.is_empty()));
            for (i, f) in filters.iter().enumerate() {
                prop_assert!(validate_filter(f).is_ok(), "{}", f);
                t.insert(f, i);
            }
            let want: Vec<usize> = (0..filters.len()).filter(|i| matches(&topic, &filters[*i])).collect();
            prop_assert_eq!(trie_matches(&t, &topic), want);
        }
    }
}
