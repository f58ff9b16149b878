//! Property tests of the decoders against naive reference implementations and against
//! arbitrary input, and MQTT acknowledgements under failing commits.

mod json_reference;
mod line_protocol_reference;
mod mqtt_acks;
mod robustness;
