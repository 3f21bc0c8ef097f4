//! `application/x-www-form-urlencoded` bodies and query strings with Stripe's bracket syntax
//! (`payload[value]=3`, `items[0][price]=p`, `expand[]=x`) parsed into nested JSON objects.

use serde_json::{Map, Value};

/// Decodes `%XX` escapes and `+` (space).
pub fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 3 <= bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Parses a form body or query string into a JSON object of strings and nested objects.
/// Array-style keys (`expand[]`) become objects keyed by position.
pub fn parse(s: &str) -> Value {
    let mut root = Map::new();
    for (n, pair) in s.split('&').filter(|p| !p.is_empty()).enumerate() {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(k);
        let value = decode(v);
        let mut path: Vec<String> = Vec::new();
        match key.find('[') {
            None => path.push(key),
            Some(i) => {
                path.push(key[..i].to_string());
                for seg in key[i..].split('[').skip(1) {
                    let seg = seg.trim_end_matches(']');
                    path.push(if seg.is_empty() { n.to_string() } else { seg.to_string() });
                }
            }
        }
        insert(&mut root, &path, value);
    }
    Value::Object(root)
}

fn insert(map: &mut Map<String, Value>, path: &[String], value: String) {
    if path.len() == 1 {
        map.insert(path[0].clone(), Value::String(value));
        return;
    }
    let child = map.entry(path[0].clone()).or_insert_with(|| Value::Object(Map::new()));
    if !child.is_object() {
        *child = Value::Object(Map::new());
    }
    insert(child.as_object_mut().expect("object"), &path[1..], value);
}

/// Percent-encodes a form/query value or a path segment.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brackets_nest() {
        let v = parse("event_name=api_calls&payload[stripe_customer_id]=cus_1&payload[value]=12&expand[]=a&q=a%20b+c");
        assert_eq!(v["event_name"], "api_calls");
        assert_eq!(v["payload"]["stripe_customer_id"], "cus_1");
        assert_eq!(v["payload"]["value"], "12");
        assert_eq!(v["q"], "a b c");
        assert!(v["expand"].is_object());
    }

    #[test]
    fn escapes_decode() {
        assert_eq!(decode("metadata%5Btally_org_id%5D"), "metadata[tally_org_id]");
        assert_eq!(decode("100%"), "100%");
    }
}
