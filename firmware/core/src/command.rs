//! What a device does with a command before and after running it.
//!
//! Delivery is at least once: after a lost acknowledgement or a server restart the same
//! command (same `id`) comes again. [`Commands::decide`] recognises it and answers with the
//! result it had, without running it twice. It also refuses what the device's management
//! level or its lock forbids, with the reason, as the platform's own checks do (the device
//! is the last line: a command that got past a misconfigured server still stops here).

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;

use serde_json::json;

use crate::payload::{Command, CommandResult, CommandStatus};

/// How much the platform may manage the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Actuation only: no management command.
    None,
    /// Management, but no software management (`wipe`, updates).
    Semi,
    /// Everything.
    Full,
}

/// What a command does, for the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Moves an actuator (a device type's own commands).
    Actuation,
    /// The standard management commands.
    Management,
    /// Software management: `wipe`, `install`.
    Software,
}

/// The kind of command `name`.
pub fn kind_of(name: &str) -> Kind {
    match name {
        "lock" | "unlock" | "reboot" | "set_config" | "enable_feature" | "disable_feature" | "locate"
        | "rotate_credentials" => Kind::Management,
        "wipe" | "install" => Kind::Software,
        _ => Kind::Actuation,
    }
}

/// What to do with a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Run it, then report with [`Commands::finish`].
    Run,
    /// Do not run it; publish this answer (a refusal, or the result of an earlier run of the
    /// same command).
    Answer(CommandResult),
    /// It is running now (a redelivery while it runs): nothing to do, its answer will come.
    Running,
}

/// Results remembered for repeats.
pub const REMEMBERED: usize = 64;

/// A device's command state: its level, its lock, the commands it ran lately.
#[derive(Debug)]
pub struct Commands {
    level: Level,
    locked: bool,
    running: VecDeque<String>,
    done: VecDeque<CommandResult>,
}

impl Commands {
    /// A device of `level`, unlocked.
    pub fn new(level: Level) -> Self {
        Self { level, locked: false, running: VecDeque::new(), done: VecDeque::new() }
    }

    /// Whether the device is locked (actuation and telemetry stopped).
    pub fn locked(&self) -> bool {
        self.locked
    }

    /// Locks or unlocks the device (the `lock` and `unlock` commands, or a restored state).
    pub fn set_locked(&mut self, locked: bool) {
        self.locked = locked;
    }

    /// Decides what to do with `cmd`.
    pub fn decide(&mut self, cmd: &Command) -> Decision {
        if let Some(done) = self.done.iter().find(|r| r.id == cmd.id) {
            return Decision::Answer(done.clone());
        }
        if self.running.iter().any(|id| *id == cmd.id) {
            return Decision::Running;
        }
        let refuse = |why: String| {
            Decision::Answer(CommandResult {
                id: cmd.id.clone(),
                status: CommandStatus::Failed,
                result: json!({ "error": why }),
            })
        };
        match (kind_of(&cmd.name), self.level) {
            (Kind::Management | Kind::Software, Level::None) => {
                return refuse(format!("this device is not managed: it refuses `{}`", cmd.name));
            }
            (Kind::Software, Level::Semi) => {
                return refuse(format!("this device is semi-managed: it refuses software management (`{}`)", cmd.name));
            }
            (Kind::Actuation, _) if self.locked => {
                return refuse(format!("the device is locked: `{}` waits for `unlock`", cmd.name));
            }
            _ => {}
        }
        self.running.push_back(cmd.id.clone());
        Decision::Run
    }

    /// Records how a command that was [`Decision::Run`] ended; returns the answer to publish.
    pub fn finish(&mut self, result: CommandResult) -> CommandResult {
        self.running.retain(|id| *id != result.id);
        if self.done.len() == REMEMBERED {
            self.done.pop_front();
        }
        self.done.push_back(result.clone());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn cmd(id: &str, name: &str) -> Command {
        Command { id: id.into(), name: name.into(), params: Value::Null }
    }

    fn refused(d: &Decision) -> Option<String> {
        match d {
            Decision::Answer(r) if r.status == CommandStatus::Failed => r.result["error"].as_str().map(String::from),
            _ => None,
        }
    }

    #[test]
    fn a_repeat_is_answered_again_not_run_again() {
        let mut c = Commands::new(Level::Full);
        assert_eq!(c.decide(&cmd("1", "open_valve")), Decision::Run);
        assert_eq!(c.decide(&cmd("1", "open_valve")), Decision::Running);
        let r = CommandResult { id: "1".into(), status: CommandStatus::Succeeded, result: json!({"ok": true}) };
        c.finish(r.clone());
        assert_eq!(c.decide(&cmd("1", "open_valve")), Decision::Answer(r));
        assert_eq!(c.decide(&cmd("2", "open_valve")), Decision::Run);
    }

    #[test]
    fn levels_and_the_lock_refuse_with_the_reason() {
        let mut none = Commands::new(Level::None);
        assert!(refused(&none.decide(&cmd("a", "reboot"))).is_some_and(|e| e.contains("not managed")));
        assert_eq!(none.decide(&cmd("b", "open_valve")), Decision::Run);
        let mut semi = Commands::new(Level::Semi);
        assert!(refused(&semi.decide(&cmd("c", "wipe"))).is_some_and(|e| e.contains("semi-managed")));
        assert_eq!(semi.decide(&cmd("d", "lock")), Decision::Run);
        semi.set_locked(true);
        assert!(refused(&semi.decide(&cmd("e", "open_valve"))).is_some_and(|e| e.contains("locked")));
        assert_eq!(semi.decide(&cmd("f", "unlock")), Decision::Run, "management still works while locked");
    }

    #[test]
    fn only_the_latest_results_are_remembered() {
        let mut c = Commands::new(Level::Full);
        for i in 0..=REMEMBERED {
            let id = format!("{i}");
            assert_eq!(c.decide(&cmd(&id, "x")), Decision::Run);
            c.finish(CommandResult { id, status: CommandStatus::Succeeded, result: Value::Null });
        }
        assert_eq!(c.decide(&cmd("0", "x")), Decision::Run, "the oldest was forgotten");
        assert!(matches!(c.decide(&cmd("1", "x")), Decision::Answer(_)));
    }
}
