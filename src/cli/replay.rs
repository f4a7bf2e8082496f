//! `pinkeeper replay FILE`: plays a fixture through the engine offline (`src/replay.rs`) and
//! prints every decision.

use std::process::ExitCode;

/// Exit 0 when the story ran and its expectations held, 1 when not, 2 when unreadable.
pub(crate) fn replay(file: &std::path::Path, json: bool, settle_ms: u64) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("pinkeeper: cannot read {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    let mut replay = crate::replay::Replay::new(crate::engine::Config {
        settle: settle_ms,
        ..Default::default()
    });
    let result = replay.run(&text);
    let mut out = String::new();
    for (at, decision) in &replay.decisions {
        let line = if json {
            crate::replay::decision_json(at.wall, decision).map(|v| v.to_string())
        } else {
            crate::replay::describe(at.wall, decision)
        };
        if let Some(line) = line {
            out.push_str(&line);
            out.push('\n');
        }
    }
    use std::io::Write;
    // A closed pipe (`| head`) is not an error worth a message.
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pinkeeper: {}: {e}", file.display());
            ExitCode::FAILURE
        }
    }
}
