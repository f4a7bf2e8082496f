//! The log lines on stderr: one line per event, whatever bytes its fields carry.
//!
//! Owns the writer of the text format. tracing-subscriber's fmt layer formats each event into
//! one buffer and hands it to one writer from [`MakeWriter::make_writer_for`] in a single
//! `write_all` (`fmt_layer.rs`, `on_event`, 0.3.23). [`Escaping`] keeps what that writer
//! receives and, when it is dropped, writes it with every control character escaped as
//! [`crate::escape`] spells it (`\n`, `\r`, `\t`, `\xNN`, `\u{NNNN}`), except the event's one
//! final newline. A file name with a newline therefore cannot forge a line, in whichever field
//! or message (or span, or error source) it is logged.
//!
//! Why the writer and not a field formatter: it sees the finished line, so no field, message,
//! span field or error chain can slip past it, whatever formatter code produced it. The one
//! thing it cannot tell apart is an ANSI colour the formatter wrote from one inside a value;
//! with colours on (stderr is a terminal) it keeps SGR sequences (`ESC [ digits ; m`, colours
//! only: they cannot move the cursor, erase or start a line) and escapes every other `ESC`.
//! With colours off (a journal, a file, a pipe) every `ESC` is escaped.
//!
//! The JSON format needs none of this: serde_json writes every control character below U+0020
//! of a string as an escape, so an event is one line.

use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;

/// A [`MakeWriter`] whose writers escape control characters (see the module's comment).
#[derive(Debug, Clone)]
pub(crate) struct Escaping<M> {
    inner: M,
    ansi: bool,
}

impl<M> Escaping<M> {
    /// Escapes what `inner`'s writers would write. `ansi`: the formatter writes ANSI colours,
    /// which are kept.
    pub(crate) fn new(inner: M, ansi: bool) -> Self {
        Escaping { inner, ansi }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Escaping<M> {
    type Writer = EventWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        EventWriter::new(self.inner.make_writer(), self.ansi)
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        EventWriter::new(self.inner.make_writer_for(meta), self.ansi)
    }
}

/// Collects one event and writes it escaped, in one `write_all`, when flushed or dropped.
#[derive(Debug)]
pub(crate) struct EventWriter<W: Write> {
    inner: W,
    ansi: bool,
    event: Vec<u8>,
}

impl<W: Write> EventWriter<W> {
    fn new(inner: W, ansi: bool) -> Self {
        EventWriter {
            inner,
            ansi,
            event: Vec::new(),
        }
    }

    fn emit(&mut self) -> io::Result<()> {
        if self.event.is_empty() {
            return Ok(());
        }
        let line = escape_event(&self.event, self.ansi);
        self.event.clear();
        self.inner.write_all(line.as_bytes())
    }
}

impl<W: Write> Write for EventWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.event.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.emit()?;
        self.inner.flush()
    }
}

impl<W: Write> Drop for EventWriter<W> {
    fn drop(&mut self) {
        // Nothing to report a failed write of a log line to.
        let _ = self.emit();
    }
}

/// One event's bytes as one line: every control character escaped except a final `\n` (and,
/// when `ansi`, SGR colour sequences).
pub(crate) fn escape_event(event: &[u8], ansi: bool) -> String {
    let (body, newline) = match event.strip_suffix(b"\n") {
        Some(body) => (body, true),
        None => (event, false),
    };
    let mut line = String::with_capacity(body.len() + 1);
    let mut char_buf = [0u8; 4];
    for chunk in body.utf8_chunks() {
        let valid = chunk.valid();
        let mut rest = valid;
        while let Some(c) = rest.chars().next() {
            if c == '\x1b' && ansi {
                if let Some(len) = sgr_len(rest) {
                    line.push_str(&rest[..len]);
                    rest = &rest[len..];
                    continue;
                }
            }
            let control = c.is_control() || c == '\x7f' || c == '\u{2028}' || c == '\u{2029}';
            if control {
                let one: &str = c.encode_utf8(&mut char_buf);
                line.push_str(&crate::escape::text(one).to_string());
            } else {
                line.push(c);
            }
            rest = &rest[c.len_utf8()..];
        }
        if !chunk.invalid().is_empty() {
            line.push_str(&crate::escape::bytes(chunk.invalid()).to_string());
        }
    }
    if newline {
        line.push('\n');
    }
    line
}

/// The length of the SGR sequence (`ESC [ [0-9;]* m`) `text` starts with, if it does.
fn sgr_len(text: &str) -> Option<usize> {
    let params = text.strip_prefix("\x1b[")?;
    let digits = params
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b';')
        .count();
    (params.as_bytes().get(digits) == Some(&b'm')).then_some(2 + digits + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Everything the subscriber writes, shared with the test.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Sink {
        type Writer = Sink;
        fn make_writer(&'a self) -> Sink {
            self.clone()
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[derive(Debug)]
    struct Forged;
    impl std::fmt::Display for Forged {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("bad\nINFO forged\rby an error")
        }
    }
    impl std::error::Error for Forged {}

    fn log_forgeries() {
        let forged = "a\nINFO forged";
        let path = std::path::PathBuf::from("/images/x\n2026-01-01T00:00:00Z  INFO y.tar");
        let span = tracing::info_span!("scan", dir = %forged);
        let _entered = span.enter();
        let odd = "\t\u{85}\u{2028}\x07";
        tracing::info!(file = %forged, debug = ?path, odd = %odd, "read {forged} \t");
        tracing::warn!(
            error = &Forged as &dyn std::error::Error,
            "ansi \x1b[2J\x1b[31mred"
        );
    }

    #[test]
    fn a_newline_anywhere_in_an_event_yields_one_line_of_text() {
        let sink = Sink::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(Escaping::new(sink.clone(), false))
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, log_forgeries);
        let text = sink.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(text.ends_with('\n'));
        assert!(lines[0].contains("file=a\\nINFO forged"), "{text}");
        assert!(lines[0].contains("read a\\nINFO forged \\t"), "{text}");
        assert!(
            lines[0].contains("odd=\\t\\u{0085}\\u{2028}\\x07"),
            "{text}"
        );
        assert!(lines[0].contains("scan{dir=a\\nINFO forged}"), "{text}");
        assert!(
            lines[1].contains("bad\\nINFO forged\\rby an error"),
            "{text}"
        );
        assert!(!text.contains('\x1b') && !text.contains('\r'), "{text:?}");
    }

    #[test]
    fn colours_stay_on_a_terminal_and_only_colours() {
        let sink = Sink::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(Escaping::new(sink.clone(), true))
            .with_ansi(true)
            .finish();
        tracing::subscriber::with_default(subscriber, log_forgeries);
        let text = sink.text();
        assert_eq!(text.lines().count(), 2, "{text}");
        // The level's colour is there; a value's screen erase is not.
        assert!(
            text.contains("\x1b[32m") || text.contains("\x1b[33m"),
            "{text:?}"
        );
        assert!(!text.contains("\x1b[2J"), "{text:?}");
    }

    #[test]
    fn json_lines_escape_by_themselves() {
        let sink = Sink::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(sink.clone())
            .json()
            .flatten_event(true)
            .finish();
        tracing::subscriber::with_default(subscriber, log_forgeries);
        let text = sink.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["file"], "a\nINFO forged");
        assert!(first["message"]
            .as_str()
            .unwrap()
            .starts_with("read a\nINFO forged"));
    }

    #[test]
    fn escaping_keeps_the_final_newline_only() {
        assert_eq!(escape_event(b"a\nb\n", false), "a\\nb\n");
        assert_eq!(escape_event(b"a\n\n", false), "a\\n\n");
        assert_eq!(escape_event(b"no newline\r", false), "no newline\\r");
        assert_eq!(
            escape_event(b"\x1b[1mx\x1b[0m\n", false),
            "\\x1b[1mx\\x1b[0m\n"
        );
        assert_eq!(
            escape_event(b"\x1b[1mx\x1b[0m\n", true),
            "\x1b[1mx\x1b[0m\n"
        );
        assert_eq!(escape_event(b"\x1b[1;2H\x1b\n", true), "\\x1b[1;2H\\x1b\n");
        assert_eq!(escape_event(b"caf\xe9 \\ ok\n", false), "caf\\xe9 \\ ok\n");
    }
}
