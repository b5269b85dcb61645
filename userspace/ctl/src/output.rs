//! One way to print every answer: a table for people, or the same data as JSON or YAML for
//! scripts (`-o json|yaml`).

use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned text for people.
    #[default]
    Text,
    /// One JSON document (pretty-printed).
    Json,
    /// One YAML document.
    Yaml,
}

impl Format {
    /// Prints `value` as JSON/YAML, or as what `text` renders from it.
    pub fn emit<T: Serialize>(
        self,
        value: &T,
        text: impl FnOnce(&T) -> String,
    ) -> anyhow::Result<()> {
        match self {
            Format::Text => {
                let out = text(value);
                print!("{out}");
                if !out.is_empty() && !out.ends_with('\n') {
                    println!();
                }
            }
            Format::Json => println!("{}", serde_json::to_string_pretty(value)?),
            Format::Yaml => print!("{}", serde_norway::to_string(value)?),
        }
        Ok(())
    }
}

/// A text table: the header row, then the rows, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `-` for a missing value.
pub fn or_dash<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_to_the_widest_cell() {
        let t = table(
            &["NAME", "VNI"],
            &[
                vec!["dcos".into(), "1024".into()],
                vec!["blue-long".into(), "7".into()],
            ],
        );
        assert_eq!(t, "NAME       VNI\ndcos       1024\nblue-long  7\n");
    }
}
