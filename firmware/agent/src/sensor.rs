//! Where readings come from: a small trait and three sources, named on the command line as
//! `--sensor KIND:FIELD[:ARG]`:
//!
//! - `sim:temperature[:BASE[:AMPLITUDE]]`: a slow sine around BASE with noise (a simulated
//!   signal; BASE 20, AMPLITUDE 5 by default);
//! - `file:cpu_temp:/sys/class/thermal/thermal_zone0/temp`: the number in a file (sysfs);
//! - `cmd:load:cat /proc/loadavg | cut -d' ' -f1`: the number a shell command prints.
//!
//! A value that cannot be read or parsed is left out of that reading (and logged once per
//! failure run), never sent as zero.

use ferrite_agent_core::payload::FieldValue;

/// A source of one field.
pub trait Sensor: Send {
    /// The field's name.
    fn field(&self) -> &str;
    /// The current value, or why there is none.
    fn read(&mut self, now_ms: i64) -> Result<FieldValue, String>;
}

/// A simulated signal.
#[derive(Debug)]
pub struct Simulated {
    field: String,
    base: f64,
    amplitude: f64,
    phase: f64,
}

impl Sensor for Simulated {
    fn field(&self) -> &str {
        &self.field
    }

    fn read(&mut self, now_ms: i64) -> Result<FieldValue, String> {
        let t = now_ms as f64 / 60_000.0;
        let noise = (fastrand::f64() - 0.5) * self.amplitude * 0.1;
        let v = self.base + self.amplitude * (t + self.phase).sin() + noise;
        Ok(FieldValue::Float((v * 100.0).round() / 100.0))
    }
}

/// A number read from a file.
#[derive(Debug)]
pub struct FileValue {
    field: String,
    path: std::path::PathBuf,
}

fn number(text: &str) -> Result<FieldValue, String> {
    let t = text.trim();
    if let Ok(i) = t.parse::<i64>() {
        return Ok(FieldValue::Int(i));
    }
    t.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .map(FieldValue::Float)
        .ok_or_else(|| format!("{t:?} is not a number"))
}

impl Sensor for FileValue {
    fn field(&self) -> &str {
        &self.field
    }

    fn read(&mut self, _: i64) -> Result<FieldValue, String> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        number(&text)
    }
}

/// A number printed by a command.
#[derive(Debug)]
pub struct CommandValue {
    field: String,
    command: String,
}

impl Sensor for CommandValue {
    fn field(&self) -> &str {
        &self.field
    }

    fn read(&mut self, _: i64) -> Result<FieldValue, String> {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .output()
            .map_err(|e| format!("`{}`: {e}", self.command))?;
        if !out.status.success() {
            return Err(format!("`{}` exited with {}", self.command, out.status));
        }
        number(&String::from_utf8_lossy(&out.stdout))
    }
}

/// Parses a `--sensor` value.
pub fn parse(spec: &str) -> Result<Box<dyn Sensor>, String> {
    let mut parts = spec.splitn(3, ':');
    let kind = parts.next().unwrap_or_default();
    let field = parts.next().filter(|f| !f.is_empty()).ok_or_else(|| {
        format!("--sensor {spec:?}: write KIND:FIELD[:ARG] (sim:temperature, file:temp:/path, cmd:load:COMMAND)")
    })?;
    if matches!(field, "ts" | "seq" | "device_id") {
        return Err(format!("--sensor {spec:?}: `{field}` is a reserved field name"));
    }
    let arg = parts.next();
    match kind {
        "sim" => {
            let mut nums = arg.unwrap_or_default().split(':').filter(|s| !s.is_empty());
            let mut next = |d: f64| -> Result<f64, String> {
                nums.next()
                    .map_or(Ok(d), |s| s.parse().map_err(|_| format!("--sensor {spec:?}: {s:?} is not a number")))
            };
            Ok(Box::new(Simulated {
                field: field.to_owned(),
                base: next(20.0)?,
                amplitude: next(5.0)?,
                phase: fastrand::f64() * std::f64::consts::TAU,
            }))
        }
        "file" => Ok(Box::new(FileValue {
            field: field.to_owned(),
            path: arg
                .filter(|a| !a.is_empty())
                .ok_or_else(|| format!("--sensor {spec:?}: give the file's path"))?
                .into(),
        })),
        "cmd" => Ok(Box::new(CommandValue {
            field: field.to_owned(),
            command: arg
                .filter(|a| !a.is_empty())
                .ok_or_else(|| format!("--sensor {spec:?}: give the command"))?
                .into(),
        })),
        other => Err(format!("--sensor {spec:?}: unknown kind {other:?} (sim, file or cmd)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensors_parse_and_read() -> Result<(), String> {
        let mut s = parse("sim:temperature:30:2")?;
        assert_eq!(s.field(), "temperature");
        let FieldValue::Float(v) = s.read(0)? else { return Err("not a float".into()) };
        assert!((27.0..=33.0).contains(&v), "{v}");
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let f = dir.path().join("temp");
        std::fs::write(&f, "41500\n").map_err(|e| e.to_string())?;
        let mut s = parse(&format!("file:cpu:{}", f.display()))?;
        assert_eq!(s.read(0)?, FieldValue::Int(41500));
        std::fs::write(&f, "hot").map_err(|e| e.to_string())?;
        assert!(s.read(0).is_err_and(|e| e.contains("not a number")));
        let mut s = parse("cmd:answer:echo 4.25")?;
        assert_eq!(s.read(0)?, FieldValue::Float(4.25));
        assert!(parse("sim").is_err());
        assert!(parse("gps:x").is_err());
        assert!(parse("sim:ts").is_err());
        Ok(())
    }
}
