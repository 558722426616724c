//! The usage reader, which searches before it parses.
//!
//! Property: for any JSON object, the compact and the pretty spelling read the same usage,
//! and that is the object's own top-level `usage` as serde reads it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use switchyard::wire::Usage;
use switchyard::wire::event::read_usage;

fuzz_target!(|data: &[u8]| {
    // Outside bytes may read as anything; what they read must not panic.
    let _ = read_usage(data);
    let Ok(value @ Value::Object(_)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let expected = match value.get("usage") {
        Some(usage @ Value::Object(_)) => serde_json::from_value::<Usage>(usage.clone()).ok(),
        _ => None,
    };
    let compact = serde_json::to_vec(&value).unwrap_or_default();
    let pretty = serde_json::to_vec_pretty(&value).unwrap_or_default();
    assert_eq!(read_usage(&compact), expected, "compact spelling");
    assert_eq!(read_usage(&pretty), expected, "pretty spelling");
});
