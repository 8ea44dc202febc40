//! `*` and `?` wildcards, the patterns pipeline files use for names.

/// Whether `text` matches `pattern`: `*` matches any run of characters
/// (including none), `?` exactly one; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and the text position it currently covers up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == '?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    p = star_p + 1;
                    t = star_t + 1;
                    star = Some((star_p, star_t + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn wildcards() {
        assert!(glob_match("pump-*", "pump-0001"));
        assert!(glob_match("*", ""));
        assert!(glob_match("*-test", "pump-test"));
        assert!(glob_match("p?mp-*1", "pump-0001"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("pump-*", "valve-1"));
        assert!(!glob_match("pump", "pump-1"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("exact", "exact"));
    }
}
