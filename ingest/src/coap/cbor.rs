//! CBOR (RFC 8949) payloads, read as the JSON that the decoders take.

/// The JSON text of one CBOR data item (a map, or an array of maps), or why it has none:
/// a malformed item, bytes after it, or a value JSON cannot carry (a byte string, a map key
/// that is not text).
pub(crate) fn to_json(cbor: &[u8]) -> Result<Vec<u8>, String> {
    let mut rest = cbor;
    let item: ciborium::Value = ciborium::from_reader(&mut rest).map_err(|e| match e {
        ciborium::de::Error::Semantic(_, why) => why,
        ciborium::de::Error::Syntax(at) => format!("malformed CBOR at byte {at}"),
        ciborium::de::Error::Io(e) => format!("truncated CBOR: {e}"),
        ciborium::de::Error::RecursionLimitExceeded => "CBOR nested too deep".to_owned(),
    })?;
    if !rest.is_empty() {
        return Err(format!(
            "{} bytes after the first CBOR item; send one item (a map or an array of maps)",
            rest.len()
        ));
    }
    let value = json(item).map_err(|e| format!("{e}; send text, numbers, booleans, arrays and maps with text keys"))?;
    serde_json::to_vec(&value).map_err(|e| e.to_string())
}

/// A CBOR value as JSON: a tag (an epoch time, a date string) reads as what it tags, and a
/// float JSON cannot carry (NaN, infinity) as null.
fn json(item: ciborium::Value) -> Result<serde_json::Value, String> {
    use ciborium::Value as C;
    use serde_json::Value as J;
    Ok(match item {
        C::Integer(i) => {
            let i = i128::from(i);
            match (i64::try_from(i), u64::try_from(i)) {
                (Ok(v), _) => J::from(v),
                (_, Ok(v)) => J::from(v),
                _ => return Err(format!("the integer {i} does not fit 64 bits")),
            }
        }
        C::Float(f) => serde_json::Number::from_f64(f).map_or(J::Null, J::Number),
        C::Text(t) => J::String(t),
        C::Bool(b) => J::Bool(b),
        C::Null => J::Null,
        C::Tag(_, inner) => json(*inner)?,
        C::Array(items) => J::Array(items.into_iter().map(json).collect::<Result<_, _>>()?),
        C::Map(entries) => {
            let mut map = serde_json::Map::with_capacity(entries.len());
            for (k, v) in entries {
                let C::Text(k) = k else { return Err(format!("a map key ({k:?}) is not text")) };
                map.insert(k, json(v)?);
            }
            J::Object(map)
        }
        C::Bytes(b) => return Err(format!("a byte string ({} bytes) has no JSON form", b.len())),
        other => return Err(format!("{other:?} has no JSON form")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbor(v: &serde_json::Value) -> Vec<u8> {
        let mut out = Vec::new();
        match ciborium::into_writer(v, &mut out) {
            Ok(()) => out,
            Err(e) => panic!("encoding {v}: {e}"),
        }
    }

    #[test]
    fn maps_arrays_numbers_and_text_read_as_the_same_json() -> Result<(), String> {
        let v = serde_json::json!([
            {"device_id": "d1", "temp": 21.5, "count": 7, "neg": -3, "on": true, "note": "ok", "nested": {"a": [1, 2]}},
            {"device_id": "d2", "temp": null}
        ]);
        let json: serde_json::Value = serde_json::from_slice(&to_json(&cbor(&v))?).map_err(|e| e.to_string())?;
        assert_eq!(json, v);
        Ok(())
    }

    #[test]
    fn what_json_cannot_carry_is_refused_with_the_reason() {
        // {"raw": h'0102'}: a byte string.
        let bytes = [0xa1, 0x63, b'r', b'a', b'w', 0x42, 0x01, 0x02];
        let e = to_json(&bytes).err().unwrap_or_default();
        assert!(e.contains("byte"), "{e}");
        // {1: 2}: a map key that is not text.
        let e = to_json(&[0xa1, 0x01, 0x02]).err().unwrap_or_default();
        assert!(e.contains("text keys"), "{e}");
        // A map that announces a key it does not carry.
        let e = to_json(&[0xa1, 0x63, b'a']).err().unwrap_or_default();
        assert!(!e.is_empty());
        // Two items.
        let e = to_json(&[0xa0, 0xa0]).err().unwrap_or_default();
        assert!(e.contains("after the first CBOR item"), "{e}");
    }

    #[test]
    fn a_tagged_epoch_time_reads_as_its_number() -> Result<(), String> {
        // {"ts": 1(1700000000)}
        let bytes = [0xa1, 0x62, b't', b's', 0xc1, 0x1a, 0x65, 0x53, 0xf1, 0x00];
        assert_eq!(to_json(&bytes)?, br#"{"ts":1700000000}"#);
        Ok(())
    }
}
