//! Topic exchange matching: words separated by `.`; `*` matches exactly one word, `#` zero
//! or more.

/// Whether routing key `key` matches binding pattern `pattern`.
pub(super) fn matches(pattern: &str, key: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = key.split('.').collect();
    words_match(&pattern, &key)
}

fn words_match(pattern: &[&str], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((&"#", rest)) => (0..=key.len()).any(|skip| words_match(rest, &key[skip..])),
        Some((&"*", rest)) => !key.is_empty() && words_match(rest, &key[1..]),
        Some((word, rest)) => key.first() == Some(word) && words_match(rest, &key[1..]),
    }
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
    }
}
