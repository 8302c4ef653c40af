//! A guest's crash in one line: what a Rust panic or an uncaught Python exception wrote to stderr
//! before the trap, cut to what an operator acts on — where, and why. It goes into the retry reason
//! (and so `_dlq_reason`, the WARN line and `handler run/test`), where "wasm `unreachable` instruction
//! executed" alone would say nothing. (JavaScript exceptions come back as the guest's own error.)

/// The longest crash text kept in a reason.
const MAX: usize = 400;

/// The crash `stderr` describes, if it holds one.
pub fn describe(stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let found = rust_panic(&text).or_else(|| python_exception(&text))?;
    let mut line: String = found.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.len() > MAX {
        let mut cut = MAX;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    Some(line)
}

/// `thread '…' panicked at src/lib.rs:54:17:` then the message (until the `note:` line):
/// "panicked at src/lib.rs:54:17: <message>".
fn rust_panic(text: &str) -> Option<String> {
    let start = text.rfind("panicked at ")?;
    let rest = &text[start + "panicked at ".len()..];
    let (location, message) = match rest.split_once(":\n") {
        Some((location, message)) => (location, message),
        // Older toolchains: `panicked at 'message', src/lib.rs:54:17`.
        None => return Some(format!("panicked at {}", rest.lines().next()?.trim())),
    };
    let message: Vec<&str> = message
        .lines()
        .take_while(|l| !l.starts_with("note: ") && !l.starts_with("stack backtrace"))
        .collect();
    Some(format!("panicked at {location}: {}", message.join(" ")))
}

/// `Traceback (most recent call last):`, frames, then `ValueError: message`: "ValueError: message
/// (at app.py:12)", naming the innermost frame.
fn python_exception(text: &str) -> Option<String> {
    let start = text.rfind("Traceback (most recent call last):")?;
    let body = &text[start..];
    let lines: Vec<&str> = body.lines().collect();
    let innermost = lines.iter().rev().find_map(|l| {
        let l = l.trim_start().strip_prefix("File \"")?;
        let (file, rest) = l.split_once('"')?;
        let number = rest.trim_start_matches(", line ").split(',').next()?;
        Some(format!("{file}:{}", number.trim()))
    });
    // The exception is the last line that is not indented (chained tracebacks print several).
    let exception = lines
        .iter()
        .rev()
        .find(|l| !l.is_empty() && !l.starts_with(' ') && !l.starts_with("Traceback"))?;
    Some(match innermost {
        Some(at) => format!("{} (at {at})", exception.trim()),
        None => exception.trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[test]
    fn a_rust_panic_says_where_and_why() {
        let stderr =
            b"\nthread '<unnamed>' panicked at src/lib.rs:54:17:\nthe guest gave up on 1-0\n\
            note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            describe(stderr).as_deref(),
            Some("panicked at src/lib.rs:54:17: the guest gave up on 1-0")
        );
        let old = b"thread 'main' panicked at 'index out of bounds', src/lib.rs:3:5\n";
        assert_eq!(
            describe(old).as_deref(),
            Some("panicked at 'index out of bounds', src/lib.rs:3:5")
        );
    }

    #[test]
    fn a_python_exception_says_what_and_where() {
        let stderr = b"Traceback (most recent call last):\n  File \"/app/handler.py\", line 30, in handle\n    \
            return route(msg)\n  File \"/app/handler.py\", line 12, in route\n    raise ValueError(f\"no task id in {msg.id}\")\n\
            ValueError: no task id in 1-0\n";
        assert_eq!(
            describe(stderr).as_deref(),
            Some("ValueError: no task id in 1-0 (at /app/handler.py:12)")
        );
    }

    #[test]
    fn other_output_is_no_crash_and_a_long_one_is_cut() {
        assert_eq!(describe(b"hello\nworld\n"), None);
        assert_eq!(describe(b""), None);
        let long = format!("thread 'x' panicked at a.rs:1:1:\n{}\n", "é".repeat(500));
        let got = describe(long.as_bytes()).unwrap();
        assert!(
            got.len() <= 400 + '…'.len_utf8() && got.ends_with('…'),
            "{got}"
        );
    }
}
