//! Rewriting the ARNs of a JSON policy document without re-serializing it:
//! everything but the rewritten strings stays byte for byte (key order,
//! whitespace), and no document tree is built.

use serde::de::IgnoredAny;
use std::borrow::Cow;

/// A policy document known to be JSON.
#[derive(Debug, Clone, Copy)]
pub struct PolicyDocument<'a>(&'a str);

impl<'a> PolicyDocument<'a> {
    /// Checks that `text` is one JSON value.
    pub fn parse(text: &'a str) -> Result<PolicyDocument<'a>, serde_json::Error> {
        serde_json::from_str::<IgnoredAny>(text)?;
        Ok(PolicyDocument(text))
    }

    /// Passes every string value (object keys excluded) that starts with
    /// `arn:` to `rewrite`; returns the new document when any changed. `Err`
    /// for a string that does not decode (a lone UTF-16 surrogate).
    pub fn rewrite_arns(&self, rewrite: impl Fn(&str) -> Option<String>) -> Result<Option<String>, String> {
        let text = self.0;
        let bytes = text.as_bytes();
        let mut out = String::new();
        let mut copied = 0;
        let mut at = 0;
        // In valid JSON a quote outside a string always opens one.
        while let Some(offset) = find_either(&bytes[at..], b'"', b'"') {
            let open = at + offset;
            let mut close = open + 1;
            let mut escaped = false;
            loop {
                close += find_either(&bytes[close..], b'"', b'\\').expect("valid JSON closes its strings");
                if bytes[close] == b'"' {
                    break;
                }
                escaped = true;
                close += 2;
            }
            at = close + 1;
            let is_key = bytes[at..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b':');
            let raw = &text[open + 1..close];
            if is_key || (!escaped && !raw.starts_with("arn:")) {
                continue;
            }
            let value: Cow<str> = if escaped {
                match serde_json::from_str::<String>(&text[open..=close]) {
                    Ok(value) => Cow::Owned(value),
                    Err(e) => return Err(format!("string at byte {open} does not decode: {e}")),
                }
            } else {
                Cow::Borrowed(raw)
            };
            if !value.starts_with("arn:") {
                continue;
            }
            if let Some(new) = rewrite(&value) {
                if out.is_empty() {
                    out.reserve(text.len() + 64);
                }
                out.push_str(&text[copied..open]);
                if new.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
                    out.push_str(&serde_json::to_string(&new).expect("a string serializes"));
                } else {
                    out.push('"');
                    out.push_str(&new);
                    out.push('"');
                }
                copied = close + 1;
            }
        }
        if copied == 0 {
            return Ok(None);
        }
        out.push_str(&text[copied..]);
        Ok(Some(out))
    }
}

/// The first position of `a` or `b` in `haystack`, eight bytes at a time
/// (documents are kilobytes, and this is most of the scanning).
fn find_either(haystack: &[u8], a: u8, b: u8) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // A byte of `word ^ pattern` is zero where `word` holds the byte.
    let zero_bytes = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let (pattern_a, pattern_b) = (ONES * u64::from(a), ONES * u64::from(b));
    let mut chunks = haystack.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let found = zero_bytes(word ^ pattern_a) | zero_bytes(word ^ pattern_b);
        if found != 0 {
            // The lowest flagged byte is a true match (borrows only run upwards).
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    chunks.remainder().iter().position(|&byte| byte == a || byte == b).map(|i| at + i)
}

/// `arn` for `region` and the account `account_map` gives its account: the
/// source region becomes `region`, other regions and `*` stay. `None` when
/// nothing changes or `arn` is not an ARN.
pub fn map_arn(
    arn: &str,
    source_region: &str,
    region: &str,
    account_map: &std::collections::BTreeMap<String, String>,
) -> Option<String> {
    // The five separators are near the start: a plain loop beats a searcher per part.
    let mut colons = [0usize; 5];
    let mut found = 0;
    for (at, _) in arn.bytes().enumerate().filter(|&(_, byte)| byte == b':') {
        colons[found] = at;
        found += 1;
        if found == colons.len() {
            break;
        }
    }
    if found < colons.len() || &arn[..colons[0]] != "arn" {
        return None;
    }
    let part = |n: usize| &arn[colons[n - 1] + 1..colons[n]];
    let (partition, service, arn_region, account) = (part(1), part(2), part(3), part(4));
    let resource = &arn[colons[4] + 1..];
    let moved = arn_region == source_region && source_region != region;
    let mapped_account = account_map.get(account);
    if !moved && mapped_account.is_none() {
        return None;
    }
    let new_region = if moved { region } else { arn_region };
    let new_account = mapped_account.map_or(account, String::as_str);
    let mut out = String::with_capacity(arn.len() + region.len());
    for part in ["arn", partition, service, new_region, new_account] {
        out.push_str(part);
        out.push(':');
    }
    out.push_str(resource);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upper(arn: &str) -> Option<String> {
        arn.contains("us-east-1").then(|| arn.replace("us-east-1", "eu-west-1"))
    }

    #[test]
    fn rewrites_values_keeps_keys_and_layout() {
        let text = r#"{ "arn:aws:iot:us-east-1:1:key" : "arn:aws:iot:us-east-1:1:topic/a",
            "list": ["x", "arn:aws:iot:us-east-1:1:client/\"q\"", "arn:aws:iot:*:1:t", 3] }"#;
        let out = PolicyDocument::parse(text).unwrap().rewrite_arns(upper).unwrap().unwrap();
        assert_eq!(
            out,
            r#"{ "arn:aws:iot:us-east-1:1:key" : "arn:aws:iot:eu-west-1:1:topic/a",
            "list": ["x", "arn:aws:iot:eu-west-1:1:client/\"q\"", "arn:aws:iot:*:1:t", 3] }"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed["list"][1], "arn:aws:iot:eu-west-1:1:client/\"q\"");
    }

    #[test]
    fn find_either_finds_the_first_of_two_bytes() {
        let naive = |h: &[u8], a: u8, b: u8| h.iter().position(|&x| x == a || x == b);
        // Every length and position up to a few words, with near-miss bytes around.
        for len in 0..40 {
            for at in 0..=len {
                let mut hay: Vec<u8> = (0..len).map(|i| [b'a', 0x22 ^ 0x80, 0x5c ^ 0x01, 0xff, 0x21][i % 5]).collect();
                if at < len {
                    hay[at] = if at % 2 == 0 { b'"' } else { b'\\' };
                }
                assert_eq!(find_either(&hay, b'"', b'\\'), naive(&hay, b'"', b'\\'), "len {len} at {at}");
                assert_eq!(find_either(&hay, b'"', b'"'), naive(&hay, b'"', b'"'), "len {len} at {at}");
            }
        }
    }

    #[test]
    fn arns_map_region_and_account() {
        let accounts = [("111122223333".to_string(), "444455556666".to_string())].into();
        let map = |arn| map_arn(arn, "us-east-1", "eu-west-1", &accounts);
        assert_eq!(
            map("arn:aws:iot:us-east-1:111122223333:topic/a:b").unwrap(),
            "arn:aws:iot:eu-west-1:444455556666:topic/a:b"
        );
        assert_eq!(map("arn:aws:iot:*:111122223333:t").unwrap(), "arn:aws:iot:*:444455556666:t");
        assert_eq!(map("arn:aws:iot:us-east-1:999999999999:t").unwrap(), "arn:aws:iot:eu-west-1:999999999999:t");
        assert_eq!(map("arn:aws:iot:ap-south-1:999999999999:t"), None);
        assert_eq!(map("arn:aws:iot:us-east-1"), None);
        assert_eq!(map_arn("arn:aws:iot:us-east-1:1:t", "us-east-1", "us-east-1", &Default::default()), None);
    }

    #[test]
    fn escaped_arns_are_decoded_first_and_unchanged_documents_give_none() {
        let text = r#"["\u0061rn:aws:iot:us-east-1:1:topic\/a", "x\\", "arn:aws:iot:us-east-1:1:y"]"#;
        let out = PolicyDocument::parse(text).unwrap().rewrite_arns(upper).unwrap().unwrap();
        assert_eq!(
            serde_json::from_str::<Vec<String>>(&out).unwrap(),
            ["arn:aws:iot:eu-west-1:1:topic/a", "x\\", "arn:aws:iot:eu-west-1:1:y"]
        );
        assert_eq!(PolicyDocument::parse(r#"{"a":"arn:aws:iot:*:1:t"}"#).unwrap().rewrite_arns(upper), Ok(None));
        assert!(PolicyDocument::parse("{not json").is_err());
        let lone = PolicyDocument::parse(r#"["\ud800arn"]"#).unwrap();
        assert!(lone.rewrite_arns(upper).is_err(), "a string that does not decode fails the document");
        assert!(PolicyDocument::parse(r#"{"a":1} {"b":2}"#).is_err());
    }
}
