//! Property tests of the decoders against naive reference implementations.

mod json_reference;
mod line_protocol_reference;
