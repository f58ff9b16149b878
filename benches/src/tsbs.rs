//! TSBS's IoT data, as `tsbs_generate_data --use-case=iot --format=influx` writes it:
//! trucks tagged `name, fleet, driver, model, device_version, load_capacity, fuel_capacity,
//! nominal_fuel_consumption`, a `readings` line (7 float fields from clamped random walks)
//! and a `diagnostics` line (`fuel_state`, `current_load`, integer `status`) per truck every
//! 10 s, with TSBS's damage: missing batches and entries, out-of-order entries and batches,
//! a zeroed field in 10% of entries and a zeroed tag in 1% (a line whose `name` was zeroed
//! names no truck). Deterministic: every run writes the same lines.

/// TSBS's default start: 2016-01-01T00:00:00Z, in ns.
pub const T0: i64 = 1_451_606_400_000_000_000;
/// TSBS's default log interval.
pub const INTERVAL_NS: i64 = 10_000_000_000;
/// An hour, in ns.
pub const HOUR_NS: i64 = 3_600_000_000_000;
/// Fields of a `readings` line.
pub const READINGS_FIELDS: u64 = 7;
/// Fields of a `diagnostics` line.
pub const DIAGNOSTICS_FIELDS: u64 = 3;

/// splitmix64: deterministic, so every run loads the same data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn f64(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u1 = self.f64().max(f64::MIN_POSITIVE);
        let u2 = self.f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// How a walk steps.
#[derive(Clone, Copy)]
enum Step {
    Uniform(f64, f64),
    Normal,
}

/// A clamped random walk rounded to `decimals` when read (TSBS's `FP(CWD(...))`).
#[derive(Clone, Copy)]
struct Walk {
    state: f64,
    min: f64,
    max: f64,
    step: Step,
    decimals: i32,
    /// Refuel: jump to `max` on reaching `min` (TSBS's fuel distribution).
    refill: bool,
}

impl Walk {
    fn advance(&mut self, rng: &mut Rng) {
        let d = match self.step {
            Step::Uniform(lo, hi) => rng.uniform(lo, hi),
            Step::Normal => rng.normal(),
        };
        self.state = (self.state + d).clamp(self.min, self.max);
        if self.refill && self.state == self.min {
            self.state = self.max;
        }
    }
    fn get(&self) -> f64 {
        let p = 10f64.powi(self.decimals);
        (self.state * p).round() / p
    }
}

/// One truck: its tags and the state of its signals.
struct Truck {
    tags: [(&'static str, String); 8],
    readings: [Walk; 7],
    fuel: Walk,
    load: f64,
    status: Walk,
}

const READINGS: [&str; 7] = ["latitude", "longitude", "elevation", "velocity", "heading", "grade", "fuel_consumption"];
const DIAGNOSTICS: [&str; 3] = ["fuel_state", "current_load", "status"];

impl Truck {
    fn new(i: usize, rng: &mut Rng) -> Self {
        const FLEETS: [&str; 4] = ["East", "West", "North", "South"];
        const DRIVERS: [&str; 6] = ["Derek", "Rodney", "Albert", "Andy", "Seth", "Trish"];
        const VERSIONS: [&str; 4] = ["v1.0", "v1.5", "v2.0", "v2.3"];
        // (model, load capacity, fuel capacity, nominal fuel consumption)
        const MODELS: [(&str, u32, u32, u32); 3] =
            [("F-150", 2000, 200, 15), ("G-2000", 5000, 300, 19), ("H-2", 1500, 150, 12)];
        let m = MODELS[rng.below(3)];
        let walk = |state: f64, min: f64, max: f64, step: Step, decimals: i32| Walk {
            state,
            min,
            max,
            step,
            decimals,
            refill: false,
        };
        let (geo, big, small) = (Step::Uniform(-0.005, 0.005), Step::Uniform(-10.0, 10.0), Step::Uniform(-5.0, 5.0));
        Truck {
            tags: [
                ("name", format!("truck_{i}")),
                ("fleet", FLEETS[rng.below(4)].to_owned()),
                ("driver", DRIVERS[rng.below(6)].to_owned()),
                ("model", m.0.to_owned()),
                ("device_version", VERSIONS[rng.below(4)].to_owned()),
                ("load_capacity", m.1.to_string()),
                ("fuel_capacity", m.2.to_string()),
                ("nominal_fuel_consumption", m.3.to_string()),
            ],
            readings: [
                walk(rng.f64() * 90.0, -90.0, 90.0, geo, 5),
                walk(rng.f64() * 180.0, -180.0, 180.0, geo, 5),
                walk(rng.f64() * 500.0, 0.0, 5000.0, big, 0),
                walk(0.0, 0.0, 100.0, big, 0),
                walk(rng.f64() * 360.0, 0.0, 360.0, small, 0),
                walk(0.0, 0.0, 100.0, small, 0),
                walk(25.0, 0.0, 50.0, small, 1),
            ],
            fuel: Walk { refill: true, ..walk(1.0, 0.0, 1.0, Step::Uniform(-0.001, 0.0), 1) },
            load: rng.uniform(0.0, 5000.0),
            status: walk(0.0, 0.0, 5.0, Step::Normal, 0),
        }
    }

    fn tick(&mut self, rng: &mut Rng) {
        for w in &mut self.readings {
            w.advance(rng);
        }
        self.fuel.advance(rng);
        // TSBS's lazy load: changes (uniformly in [0, 5000)) with a 5% chance per tick.
        if rng.f64() > 0.95 {
            self.load = rng.uniform(0.0, 5000.0).round();
        }
        self.status.advance(rng);
    }

    /// One line: `readings` or `diagnostics`, with tag `zero_tag` and field `zero_field` left out.
    fn line(&self, diagnostics: bool, t: i64, zero_tag: Option<usize>, zero_field: Option<usize>, out: &mut String) {
        use std::fmt::Write as _;
        out.push_str(if diagnostics { "diagnostics" } else { "readings" });
        for (i, (k, v)) in self.tags.iter().enumerate() {
            if Some(i) != zero_tag {
                let _ = write!(out, ",{k}={v}");
            }
        }
        let mut sep = ' ';
        if diagnostics {
            let values = [self.fuel.get(), self.load, self.status.get()];
            for (i, (k, v)) in DIAGNOSTICS.iter().zip(values).enumerate() {
                if Some(i) != zero_field {
                    if i == 2 {
                        let _ = write!(out, "{sep}{k}={}i", v as i64);
                    } else {
                        let _ = write!(out, "{sep}{k}={v}");
                    }
                    sep = ',';
                }
            }
        } else {
            for (i, (k, w)) in READINGS.iter().zip(&self.readings).enumerate() {
                if Some(i) != zero_field {
                    let _ = write!(out, "{sep}{k}={}", w.get());
                    sep = ',';
                }
            }
        }
        let _ = writeln!(out, " {t}");
    }
}

/// TSBS's damage to a series of entries, batch by batch of 10 (its `batch_config.go`
/// chances): what comes out is a sequence of (truck, time, tag zeroed, field zeroed).
struct Damage {
    rng: Rng,
    batch: Vec<Entry>,
    late_entries: Vec<Entry>,
    late_batches: Vec<Vec<Entry>>,
}

#[derive(Clone, Copy)]
struct Entry {
    truck: usize,
    time: i64,
    zero_tag: Option<usize>,
    zero_field: Option<usize>,
}

impl Damage {
    /// Takes the entries of one tick (one per truck, in truck order); returns those to write now.
    fn pass(&mut self, entries: impl Iterator<Item = (usize, i64)>, fields: usize, out: &mut Vec<Entry>) {
        for (truck, time) in entries {
            self.batch.push(Entry { truck, time, zero_tag: None, zero_field: None });
            if self.batch.len() == 10 {
                let batch = std::mem::take(&mut self.batch);
                self.apply(batch, fields, out);
            }
        }
    }

    fn apply(&mut self, batch: Vec<Entry>, fields: usize, out: &mut Vec<Entry>) {
        let r = &mut self.rng;
        if r.f64() < 0.01 {
            return; // a missing batch
        }
        let out_of_order_batch = r.f64() < 0.05;
        if !self.late_batches.is_empty() && r.f64() < 0.5 {
            out.extend(self.late_batches.remove(0));
        }
        let mut kept = Vec::with_capacity(batch.len());
        for mut e in batch {
            if !self.late_entries.is_empty() && r.f64() < 0.5 {
                kept.push(self.late_entries.remove(0));
            }
            if r.f64() < 0.1 {
                continue; // a missing entry
            }
            if r.f64() < 0.1 {
                e.zero_field = Some(r.below(fields));
            }
            if r.f64() < 0.01 {
                e.zero_tag = Some(r.below(8));
            }
            if r.f64() < 0.3 {
                self.late_entries.push(e);
                continue;
            }
            kept.push(e);
        }
        if out_of_order_batch {
            self.late_batches.push(kept);
        } else {
            out.extend(kept);
        }
    }
}

/// TSBS's generator: `trucks` trucks from TSBS's default start, one tick (10 s) at a time.
pub struct Generator {
    rng: Rng,
    fleet: Vec<Truck>,
    damage: [Damage; 2],
    tick: i64,
    entries: Vec<Entry>,
}

impl Generator {
    /// `trucks` trucks, seeded as every run is.
    pub fn new(trucks: usize) -> Self {
        let mut rng = Rng(42);
        let fleet = (0..trucks).map(|i| Truck::new(i, &mut rng)).collect();
        let damage = [
            Damage { rng: Rng(7), batch: Vec::new(), late_entries: Vec::new(), late_batches: Vec::new() },
            Damage { rng: Rng(8), batch: Vec::new(), late_entries: Vec::new(), late_batches: Vec::new() },
        ];
        Self { rng, fleet, damage, tick: 0, entries: Vec::new() }
    }

    /// Appends the lines of the next tick to `out` (`readings`, then `diagnostics`); how many.
    pub fn next_tick(&mut self, out: &mut String) -> usize {
        let t = T0 + self.tick * INTERVAL_NS;
        let trucks = self.fleet.len();
        let mut lines = 0;
        for (k, d) in self.damage.iter_mut().enumerate() {
            self.entries.clear();
            d.pass((0..trucks).map(|i| (i, t)), if k == 0 { 7 } else { 3 }, &mut self.entries);
            for e in &self.entries {
                self.fleet[e.truck].line(k == 1, e.time, e.zero_tag, e.zero_field, out);
                lines += 1;
            }
        }
        for truck in &mut self.fleet {
            truck.tick(&mut self.rng);
        }
        self.tick += 1;
        lines
    }

    /// The ticks generated so far.
    pub fn ticks(&self) -> i64 {
        self.tick
    }
}
