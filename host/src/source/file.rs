//! JSON lines from a file: replays, tests and examples. Follows the file as it
//! grows unless asked to stop at its end.

use super::Record;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

pub struct FileSource {
    path: PathBuf,
    label: String,
    reader: BufReader<File>,
    line: usize,
    /// A last line not yet ended by a newline (the writer may still be writing it).
    partial: String,
}

impl FileSource {
    pub fn open(path: &Path) -> std::io::Result<FileSource> {
        let file = File::open(path)?;
        let label = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        Ok(FileSource {
            path: path.to_path_buf(),
            label,
            reader: BufReader::new(file),
            line: 0,
            partial: String::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Up to `max` records. At the end of the file: an unterminated last line is
    /// returned only when `at_end_is_final` (nobody is still writing it).
    pub fn next_batch(&mut self, max: usize, at_end_is_final: bool) -> std::io::Result<Vec<Record>> {
        let mut records = Vec::new();
        while records.len() < max {
            let mut chunk = String::new();
            if self.reader.read_line(&mut chunk)? == 0 {
                if at_end_is_final && !self.partial.is_empty() {
                    let text = std::mem::take(&mut self.partial);
                    self.push(&mut records, text);
                }
                break;
            }
            self.partial.push_str(&chunk);
            if self.partial.ends_with('\n') {
                let text = std::mem::take(&mut self.partial);
                self.push(&mut records, text);
            }
        }
        Ok(records)
    }

    fn push(&mut self, records: &mut Vec<Record>, text: String) {
        self.line += 1;
        let text = text.trim_end_matches(['\n', '\r']);
        // Blank lines and `#` comments make example files readable.
        if text.trim().is_empty() || text.trim_start().starts_with('#') {
            return;
        }
        records.push(Record { text: text.to_string(), origin: format!("{}:{}", self.label, self.line) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_lines_with_origins_and_waits_for_unfinished_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"a\":1}\n\n# comment\n{\"b\":2}\n{\"c\"").unwrap();
        let mut source = FileSource::open(&path).unwrap();
        let records = source.next_batch(10, false).unwrap();
        assert_eq!(records.iter().map(|r| r.origin.as_str()).collect::<Vec<_>>(), ["events.jsonl:1", "events.jsonl:4"]);
        let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b":3}\n").unwrap();
        let records = source.next_batch(10, false).unwrap();
        assert_eq!(records[0].text, "{\"c\":3}");
        assert_eq!(records[0].origin, "events.jsonl:5");
    }
}
