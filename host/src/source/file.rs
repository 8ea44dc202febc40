//! JSON lines from a file: replays, tests and examples. Follows the file as it
//! grows unless asked to stop at its end, and resumes after a restart where
//! the last stored batch ended (its checkpoint: byte offset and line).

use super::{Batch, Record, Source, SourceError};
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub struct FileSource {
    path: PathBuf,
    label: String,
    reader: BufReader<File>,
    /// Lines and bytes consumed (complete lines only).
    line: usize,
    offset: u64,
    /// A last line not yet ended by a newline (the writer may still be writing it).
    partial: String,
    /// An unterminated last line counts as complete: nobody is writing the file.
    final_at_end: bool,
    at_end: bool,
}

impl FileSource {
    /// Opens `path`, at the start or at `checkpoint` (a position this source
    /// stored). A checkpoint past the file's end (the file was replaced by a
    /// shorter one) starts over, with a warning.
    pub fn open(path: &Path, checkpoint: Option<&str>, final_at_end: bool) -> std::io::Result<FileSource> {
        let mut file = File::open(path)?;
        let label = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        let (mut offset, mut line) = checkpoint.and_then(parse_position).unwrap_or((0, 0));
        if offset > file.metadata()?.len() {
            tracing::warn!(file = %path.display(), offset, "the file is shorter than its checkpoint: reading it from the start");
            (offset, line) = (0, 0);
        }
        file.seek(SeekFrom::Start(offset))?;
        Ok(FileSource {
            path: path.to_path_buf(),
            label,
            reader: BufReader::new(file),
            line,
            offset,
            partial: String::new(),
            final_at_end,
            at_end: false,
        })
    }

    /// The key its checkpoint is stored under.
    pub fn checkpoint_key(path: &Path) -> String {
        format!("file:{}", path.display())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Up to `max` records (reads synchronously: a local file).
    pub fn next_batch(&mut self, max: usize) -> std::io::Result<Vec<Record>> {
        let mut records = Vec::new();
        self.at_end = false;
        while records.len() < max {
            let mut chunk = String::new();
            if self.reader.read_line(&mut chunk)? == 0 {
                self.at_end = true;
                if self.final_at_end && !self.partial.is_empty() {
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
        self.offset += text.len() as u64;
        let text = text.trim_end_matches(['\n', '\r']);
        // Blank lines and `#` comments make example files readable.
        if text.trim().is_empty() || text.trim_start().starts_with('#') {
            return;
        }
        records.push(Record { text: text.to_string(), origin: format!("{}:{}", self.label, self.line) });
    }

    fn position(&self) -> String {
        format!("{} {}", self.offset, self.line)
    }
}

fn parse_position(position: &str) -> Option<(u64, usize)> {
    let (offset, line) = position.split_once(' ')?;
    Some((offset.parse().ok()?, line.parse().ok()?))
}

impl Source for FileSource {
    async fn read(&mut self, max: usize) -> Result<Batch, SourceError> {
        let records = self.next_batch(max).map_err(|e| SourceError {
            source_name: self.path.display().to_string(),
            message: format!("reading: {e}"),
        })?;
        Ok(Batch { records, checkpoints: vec![(Self::checkpoint_key(&self.path), self.position())] })
    }

    fn idle(&self) -> bool {
        self.at_end
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
        let mut source = FileSource::open(&path, None, false).unwrap();
        let records = source.next_batch(10).unwrap();
        assert_eq!(records.iter().map(|r| r.origin.as_str()).collect::<Vec<_>>(), ["events.jsonl:1", "events.jsonl:4"]);
        assert!(source.idle());
        let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b":3}\n").unwrap();
        let records = source.next_batch(10).unwrap();
        assert_eq!(records[0].text, "{\"c\":3}");
        assert_eq!(records[0].origin, "events.jsonl:5");
    }

    #[test]
    fn a_restart_resumes_after_the_last_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"a\":1}\n# note\n{\"b\":2}\n{\"c\":3}\n").unwrap();
        let mut source = FileSource::open(&path, None, true).unwrap();
        assert_eq!(source.next_batch(1).unwrap()[0].origin, "events.jsonl:1");
        let stored = source.position();
        let mut again = FileSource::open(&path, Some(&stored), true).unwrap();
        let rest = again.next_batch(10).unwrap();
        assert_eq!(rest.iter().map(|r| r.origin.as_str()).collect::<Vec<_>>(), ["events.jsonl:3", "events.jsonl:4"]);
        // A file replaced by a shorter one is read from its start.
        std::fs::write(&path, "{\"z\":0}\n").unwrap();
        let mut replaced = FileSource::open(&path, Some(&again.position()), true).unwrap();
        assert_eq!(replaced.next_batch(10).unwrap()[0].origin, "events.jsonl:1");
    }
}
