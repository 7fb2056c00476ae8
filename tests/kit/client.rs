//! A blocking NDJSON client of the ingest socket, as a script is.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// One connection. Its contract: an answer is a JSON line; [`Client::answer`] is `None` once the agent
/// closed the connection (also in the middle of an answer: a torn line is no answer), and panics on anything
/// else (no answer within 30 s, a line that is not JSON): those are the agent's faults, not the test's.
pub struct Client {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(socket: &Path) -> Client {
        Client::try_connect(socket).unwrap()
    }

    /// [`Client::connect`] that may meet a stopped agent.
    pub fn try_connect(socket: &Path) -> std::io::Result<Client> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Client { stream, reader })
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\n").as_bytes());
    }

    /// The next answer, or `None` at end of stream.
    pub fn answer(&mut self) -> Option<serde_json::Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) if !line.ends_with('\n') => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("answer {line:?} is not JSON: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("reading an answer failed: {e}"),
        }
    }

    /// A request that may meet a closed connection: `None` then.
    pub fn try_request(&mut self, line: &str) -> Option<serde_json::Value> {
        self.stream.write_all(format!("{line}\n").as_bytes()).ok()?;
        self.answer()
    }

    pub fn request(&mut self, line: &str) -> serde_json::Value {
        self.send(line);
        self.answer().expect("the agent closed the connection")
    }

    /// Sends `lines` pipelined (a thread writes while this one reads), asserts that every one is acked, and
    /// returns the event ids acked, in order.
    pub fn send_all(&mut self, lines: &[String]) -> Vec<String> {
        let mut writer = self.stream.try_clone().unwrap();
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let sender = std::thread::spawn(move || writer.write_all(text.as_bytes()).unwrap());
        let acked = lines
            .iter()
            .map(|line| {
                let answer = self.answer().expect("answer");
                assert_eq!(answer["ok"], true, "{line}: {answer}");
                answer["event_id"].as_str().unwrap().to_string()
            })
            .collect();
        sender.join().unwrap();
        acked
    }
}

pub fn metric(profile: &str, name: &str, value: f64) -> String {
    format!(r#"{{"kind":"metric","profile_id":"{profile}","name":"{name}","value":{value}}}"#)
}
