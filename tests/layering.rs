//! The house rules, checked on the source tree (docs/DESIGN.md §8):
//! - the library's modules form a pipeline and every import points down it;
//! - no library module imports the CLI, and `drafter`, `data` and `eval` do not import `train`;
//! - the library draws no UI and depends on no CLI crate (`indicatif`, `clap` live in src/cli);
//! - no library function is longer than about 120 lines.
//!
//! A failure names the file and line, and what to do instead.

use std::path::{Path, PathBuf};

/// Library modules in pipeline order: a module may use the ones before it (and itself).
const ORDER: &[&[&str]] = &[
    &["util"],
    &["assets", "nn", "tokenizer"],
    &["model"],
    &["spec"],
    &["drafter"],
    &["data"],
    &["train", "eval", "serve"],
    &["pipeline"],
];

/// Pairs that the order alone would allow but the design forbids.
const FORBIDDEN: &[(&str, &str)] = &[("eval", "train"), ("train", "eval"), ("serve", "train"), ("serve", "eval"), ("train", "serve"), ("eval", "serve")];

const MAX_FN_LINES: usize = 125;

fn level(module: &str) -> Option<usize> {
    ORDER.iter().position(|group| group.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a library file belongs to (`src/drafter/dflash.rs` → `drafter`), or
/// None for the binary (src/main.rs, src/cli/) and src/lib.rs.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_string_lossy().into_owned();
    let name = first.trim_end_matches(".rs").to_string();
    match name.as_str() {
        "main" | "lib" | "cli" => None,
        _ => Some(name),
    }
}

/// Code lines of a file, without comments, and without the `#[cfg(test)]` module at its end.
fn code_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#[cfg(test)]") {
            break;
        }
        let code = line.split("//").next().unwrap_or("").to_string();
        out.push((i + 1, code));
    }
    out
}

fn library_files() -> Vec<(String, PathBuf)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    files.into_iter().filter_map(|f| module_of(&src, &f).map(|m| (m, f))).collect()
}

#[test]
fn every_import_points_down_the_pipeline() {
    let mut violations = Vec::new();
    for (module, file) in library_files() {
        let Some(own) = level(&module) else {
            violations.push(format!("{}: module `{module}` is not in tests/layering.rs ORDER; place it in the pipeline", file.display()));
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for (line_no, code) in code_lines(&text) {
            for (pos, _) in code.match_indices("crate::") {
                let rest = &code[pos + "crate::".len()..];
                let used: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if used == "cli" {
                    violations.push(format!("{}:{line_no}: library code uses the CLI; report through an observer instead", file.display()));
                    continue;
                }
                let Some(theirs) = level(&used) else { continue };
                if used == module {
                    continue;
                }
                if theirs > own || FORBIDDEN.contains(&(module.as_str(), used.as_str())) {
                    violations.push(format!(
                        "{}:{line_no}: `{module}` uses `crate::{used}`, which sits above it in the pipeline; move the shared piece down",
                        file.display()
                    ));
                }
            }
            for ui in ["indicatif::", "clap::", "use indicatif", "use clap"] {
                if code.contains(ui) {
                    violations.push(format!("{}:{line_no}: library code uses {ui} (UI belongs in src/cli)", file.display()));
                }
            }
        }
    }
    assert!(violations.is_empty(), "layering violations:\n{}", violations.join("\n"));
}

#[test]
fn drafter_data_and_eval_never_import_train() {
    for (module, file) in library_files() {
        if !["drafter", "data", "eval"].contains(&module.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for (line_no, code) in code_lines(&text) {
            assert!(!code.contains("crate::train"), "{}:{line_no}: `{module}` imports `train`", file.display());
        }
    }
}

/// Line spans of the `fn` items of a file (brace-matched on code with strings blanked).
fn function_spans(text: &str) -> Vec<(String, usize, usize)> {
    let lines = code_lines(text);
    let mut spans = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let code = strip_literals(&lines[i].1);
        if let Some(name) = fn_name(&code) {
            let (mut depth, mut started, mut j) = (0i64, false, i);
            'scan: while j < lines.len() {
                let c = strip_literals(&lines[j].1);
                for ch in c.chars() {
                    match ch {
                        '{' => {
                            depth += 1;
                            started = true;
                        }
                        '}' => depth -= 1,
                        ';' if !started && depth == 0 => break 'scan,
                        _ => {}
                    }
                    if started && depth == 0 {
                        break 'scan;
                    }
                }
                j += 1;
            }
            if started {
                spans.push((name, lines[i].0, lines[j.min(lines.len() - 1)].0));
            }
        }
        i += 1;
    }
    spans
}

fn fn_name(code: &str) -> Option<String> {
    let t = code.trim_start();
    let t = t.strip_prefix("pub(crate) ").or_else(|| t.strip_prefix("pub(super) ")).or_else(|| t.strip_prefix("pub ")).unwrap_or(t);
    let t = t.strip_prefix("const ").unwrap_or(t);
    let t = t.strip_prefix("unsafe ").unwrap_or(t);
    let t = t.strip_prefix("fn ")?;
    Some(t.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect())
}

/// Blanks string and char literals so their braces do not count.
fn strip_literals(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut chars = code.chars().peekable();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        if in_str {
            if c == '\\' {
                chars.next();
            } else if c == '"' {
                in_str = false;
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '\'' => {
                // A char literal ('{', '\n'); lifetimes ('a) are left alone.
                let rest: String = chars.clone().take(3).collect();
                if rest.starts_with('\\') {
                    chars.next();
                    chars.next();
                    chars.next();
                } else if rest.chars().nth(1) == Some('\'') {
                    chars.next();
                    chars.next();
                } else {
                    out.push(c);
                }
            }
            _ => out.push(c),
        }
    }
    out
}

#[test]
fn no_library_function_is_longer_than_about_120_lines() {
    let mut long = Vec::new();
    for (_, file) in library_files() {
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for (name, start, end) in function_spans(&text) {
            let n = end - start + 1;
            if n > MAX_FN_LINES {
                long.push(format!("{}:{start}: fn {name} is {n} lines; split it into named steps", file.display()));
            }
        }
    }
    assert!(long.is_empty(), "functions over {MAX_FN_LINES} lines:\n{}", long.join("\n"));
}

#[test]
fn the_function_scanner_measures_what_it_should() {
    let text = "fn a() {\n    let s = \"}\";\n    let c = '{';\n}\n\nfn b(x: u32) -> u32 {\n    x\n}\ntrait T { fn c(&self); }\n";
    let spans = function_spans(text);
    assert_eq!(spans, vec![("a".to_string(), 1, 4), ("b".to_string(), 6, 8)]);
}
