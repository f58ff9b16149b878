//! The line-protocol parser against lines rendered from known values: every generated line
//! parses back to its measurement, tags, fields and timestamp; garbage never panics.

use ferrite_ingest::line_protocol::{FieldValue, parse_line};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum V {
    F(f64),
    I(i64),
    B(bool),
    S(String),
}

fn escape_key(s: &str) -> String {
    s.replace('\\', "\\\\").replace(',', "\\,").replace('=', "\\=").replace(' ', "\\ ")
}

fn render(m: &str, tags: &[(String, String)], fields: &[(String, V)], ts: Option<i64>) -> String {
    let mut line = escape_key(m);
    for (k, v) in tags {
        line.push_str(&format!(",{}={}", escape_key(k), escape_key(v)));
    }
    line.push(' ');
    let rendered: Vec<String> = fields
        .iter()
        .map(|(k, v)| {
            let v = match v {
                V::F(f) => format!("{f:?}"),
                V::I(i) => format!("{i}i"),
                V::B(b) => format!("{b}"),
                V::S(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
            };
            format!("{}={v}", escape_key(k))
        })
        .collect();
    line.push_str(&rendered.join(","));
    if let Some(ts) = ts {
        line.push_str(&format!(" {ts}"));
    }
    line
}

fn field_value() -> impl Strategy<Value = V> {
    prop_oneof![
        (-1e9f64..1e9).prop_map(V::F),
        any::<i64>().prop_map(V::I),
        any::<bool>().prop_map(V::B),
        "[a-z ,=\"\\\\]{0,8}".prop_map(V::S),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn rendered_lines_parse_back(
        m in "[a-z][a-z0-9_]{0,8}",
        tags in proptest::collection::vec(("[a-z][a-z ,=]{0,5}", "[a-z0-9][a-z0-9 ,=]{0,5}"), 0..3),
        fields in proptest::collection::vec(("[a-z][a-z ,=]{0,5}", field_value()), 1..4),
        ts in proptest::option::of(any::<i64>()),
    ) {
        let line = render(&m, &tags, &fields, ts);
        let parsed = parse_line(&line).map_err(|e| TestCaseError::fail(format!("{line:?}: {e}")))?;
        prop_assert_eq!(parsed.measurement.as_ref(), m.as_str());
        prop_assert_eq!(parsed.tags.len(), tags.len());
        for ((k, v), (pk, pv)) in tags.iter().zip(&parsed.tags) {
            prop_assert_eq!(pk.as_ref(), k.as_str());
            prop_assert_eq!(pv.as_ref(), v.as_str());
        }
        prop_assert_eq!(parsed.fields.len(), fields.len());
        for ((k, v), (pk, pv)) in fields.iter().zip(&parsed.fields) {
            prop_assert_eq!(pk.as_ref(), k.as_str());
            match (v, pv) {
                (V::F(a), FieldValue::Float(b)) => prop_assert_eq!(a, b),
                (V::I(a), FieldValue::Int(b)) => prop_assert_eq!(a, b),
                (V::B(a), FieldValue::Bool(b)) => prop_assert_eq!(a, b),
                (V::S(a), FieldValue::Str(b)) => prop_assert_eq!(a.as_str(), b.as_ref()),
                (a, b) => prop_assert!(false, "{a:?} parsed as {b:?} in {line:?}"),
            }
        }
        prop_assert_eq!(parsed.timestamp, ts);
    }

    #[test]
    fn garbage_never_panics(s in "\\PC{0,80}") {
        let _ = parse_line(&s);
    }
}
