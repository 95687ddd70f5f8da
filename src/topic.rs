//! Topic exchange matching: words separated by `.`; `*` matches exactly one word, `#` zero
//! or more.

/// Whether routing key `key` matches binding pattern `pattern`. Linear in the product of
/// the word counts, whatever the pattern (a pattern may come from configuration).
pub(crate) fn matches(pattern: &str, key: &str) -> bool {
    if !pattern.contains(['*', '#']) {
        return pattern == key;
    }
    let key: Vec<&str> = key.split('.').collect();
    // reach[i]: the pattern words so far can consume exactly the first i key words.
    let mut reach = vec![false; key.len() + 1];
    reach[0] = true;
    for word in pattern.split('.') {
        let mut next = vec![false; key.len() + 1];
        match word {
            "#" => {
                let mut any = false;
                for i in 0..=key.len() {
                    any |= reach[i];
                    next[i] = any;
                }
            }
            _ => {
                for i in 0..key.len() {
                    next[i + 1] = reach[i] && (word == "*" || word == key[i]);
                }
            }
        }
        reach = next;
    }
    reach[key.len()]
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn stars_match_one_word_and_hashes_any_number() {
        let cases = [
            ("order.placed", "order.placed", true),
            ("order.placed", "order.shipped", false),
            ("order.*", "order.placed", true),
            ("order.*", "order", false),
            ("order.*", "order.placed.eu", false),
            ("order.#", "order", true),
            ("order.#", "order.placed.eu", true),
            ("#", "anything.at.all", true),
            ("#.eu", "order.placed.eu", true),
            ("#.eu", "order.placed.us", false),
            ("*.placed.#", "order.placed", true),
            ("*.placed.#", "placed", false),
            ("a.#.z", "a.z", true),
            ("a.#.z", "a.b.c.z", true),
            ("a.#.z", "a.b.c", false),
        ];
        for (pattern, key, expected) in cases {
            assert_eq!(matches(pattern, key), expected, "{pattern} vs {key}");
        }
        // Many '#' against a long key that does not match: no backtracking blow-up.
        let pattern = format!("{}.x", vec!["#"; 60].join("."));
        let key = vec!["a"; 200].join(".");
        assert!(!matches(&pattern, &key));
        assert!(matches(&pattern, &format!("{key}.x")));
    }
}
