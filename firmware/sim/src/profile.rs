//! What a virtual device reports. `trucks` follows the shape of TSBS's "iot" use case (a
//! truck's position, elevation, velocity, heading, grade and fuel consumption, with its
//! load, fuel state and status as diagnostics) on one stream; `sensors` is a room sensor.
//! Values move by small random steps from the device's own starting point, so that series
//! look like signals rather than noise.

use ferrite_agent_core::payload::FieldValue;

use crate::args::Profile;

/// One device's signal state.
#[derive(Debug, Clone)]
pub struct Signals {
    profile: Profile,
    v: [f64; 8],
    rng: fastrand::Rng,
}

fn walk(rng: &mut fastrand::Rng, v: f64, step: f64, lo: f64, hi: f64) -> f64 {
    (v + (rng.f64() - 0.5) * 2.0 * step).clamp(lo, hi)
}

fn round(v: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (v * f).round() / f
}

impl Signals {
    /// The signals of device number `n`.
    pub fn new(profile: Profile, n: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED);
        let v = match profile {
            Profile::Trucks => [
                rng.f64() * 90.0,       // latitude
                rng.f64() * 180.0,      // longitude
                rng.f64() * 500.0,      // elevation
                rng.f64() * 100.0,      // velocity
                rng.f64() * 360.0,      // heading
                rng.f64() * 10.0,       // grade
                5.0 + rng.f64() * 20.0, // fuel consumption
                rng.f64() * 5000.0,     // load
            ],
            Profile::Sensors => [
                18.0 + rng.f64() * 6.0,  // temperature
                30.0 + rng.f64() * 30.0, // humidity
                1000.0 + rng.f64() * 30.0,
                80.0 + rng.f64() * 20.0, // battery
                0.0,
                0.0,
                0.0,
                0.0,
            ],
        };
        Self { profile, v, rng }
    }

    /// The next reading's fields.
    pub fn sample(&mut self) -> Vec<(String, FieldValue)> {
        let r = &mut self.rng;
        let v = &mut self.v;
        match self.profile {
            Profile::Trucks => {
                v[0] = walk(r, v[0], 0.001, 0.0, 90.0);
                v[1] = walk(r, v[1], 0.001, 0.0, 180.0);
                v[2] = walk(r, v[2], 2.0, 0.0, 500.0);
                v[3] = walk(r, v[3], 3.0, 0.0, 100.0);
                v[4] = walk(r, v[4], 5.0, 0.0, 360.0);
                v[5] = walk(r, v[5], 0.5, 0.0, 10.0);
                v[6] = walk(r, v[6], 0.3, 5.0, 25.0);
                v[7] = walk(r, v[7], 10.0, 0.0, 5000.0);
                let fuel_state = round(1.0 - (r.u64(0..1000) as f64) / 1000.0, 2);
                let status = r.i64(0..10);
                vec![
                    ("latitude".into(), FieldValue::Float(round(v[0], 5))),
                    ("longitude".into(), FieldValue::Float(round(v[1], 5))),
                    ("elevation".into(), FieldValue::Float(round(v[2], 1))),
                    ("velocity".into(), FieldValue::Float(round(v[3], 1))),
                    ("heading".into(), FieldValue::Float(round(v[4], 1))),
                    ("grade".into(), FieldValue::Float(round(v[5], 2))),
                    ("fuel_consumption".into(), FieldValue::Float(round(v[6], 2))),
                    ("load".into(), FieldValue::Float(round(v[7], 0))),
                    ("fuel_state".into(), FieldValue::Float(fuel_state)),
                    ("status".into(), FieldValue::Int(status)),
                ]
            }
            Profile::Sensors => {
                v[0] = walk(r, v[0], 0.2, -10.0, 45.0);
                v[1] = walk(r, v[1], 0.5, 0.0, 100.0);
                v[2] = walk(r, v[2], 0.3, 950.0, 1050.0);
                v[3] = walk(r, v[3], 0.01, 0.0, 100.0);
                vec![
                    ("temperature".into(), FieldValue::Float(round(v[0], 2))),
                    ("humidity".into(), FieldValue::Float(round(v[1], 1))),
                    ("pressure".into(), FieldValue::Float(round(v[2], 1))),
                    ("battery".into(), FieldValue::Float(round(v[3], 2))),
                ]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_stay_in_range_and_differ_per_device() {
        let mut a = Signals::new(Profile::Trucks, 1);
        let mut b = Signals::new(Profile::Trucks, 2);
        let (ra, rb) = (a.sample(), b.sample());
        assert_eq!(ra.len(), 10);
        assert_ne!(ra, rb);
        let mut s = Signals::new(Profile::Sensors, 7);
        for _ in 0..10_000 {
            let r = s.sample();
            let FieldValue::Float(t) = r[0].1 else { panic!("temperature is a float") };
            assert!((-10.0..=45.0).contains(&t));
        }
    }
}
