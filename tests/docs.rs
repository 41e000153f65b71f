//! The documentation against the tree: README.md and docs/*.md.
//!
//! * **Examples are the files that run.** A fenced block right after a marker line
//!   `<!-- example: docs/examples/FILE -->` must be that file, byte for byte: the tests that
//!   run the examples (`tests/browser.rs`, `tests/node_client.rs`, `tests/python_client.rs`)
//!   then run what a reader copies. A marker that names a missing file, or stands before no
//!   fenced block, fails. A block of client code (`html`, `js`, `mjs`, `javascript`, `python`,
//!   `py`) must carry such a marker, or `<!-- fragment: WHY -->` when it is not a program (the
//!   messages' shapes, a diff against the predecessor's client), so an example cannot be added
//!   unchecked.
//! * **Links lead somewhere.** Every relative link and image resolves to a file in the tree,
//!   and every `#anchor` to a heading of its target (GitHub's anchors). README.md links every
//!   document in docs/.
//!
//! Needs nothing outside Cargo.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every Markdown file under docs/.
fn doc_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut dirs = vec![root().join("docs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read docs/") {
            let path = entry.expect("docs/ entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// A fenced code block: its info string, its body (each line with its newline), the line
/// before its opening fence, and the line number of that fence (1-based).
#[derive(Debug)]
struct Block {
    info: String,
    body: String,
    before: String,
    line: usize,
}

/// The fenced blocks of a Markdown text (backtick or tilde fences of three or more,
/// unindented), and the lines outside them.
fn blocks(text: &str) -> (Vec<Block>, Vec<(usize, String)>) {
    let mut out = Vec::new();
    let mut prose = Vec::new();
    let mut open: Option<(String, Block)> = None;
    let mut previous = String::new();
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches('\n');
        match &mut open {
            Some((fence, block)) => {
                if bare.trim_end() == fence.as_str() {
                    let (_, block) = open.take().expect("an open block");
                    out.push(block);
                } else {
                    block.body.push_str(line);
                }
            }
            None => {
                let ticks = bare.chars().take_while(|c| *c == '`' || *c == '~').count();
                let first = bare.chars().next();
                let uniform = bare[..ticks].chars().all(|c| Some(c) == first);
                if ticks >= 3 && uniform {
                    let fence = bare[..ticks].to_string();
                    let block = Block {
                        info: bare[ticks..].trim().to_string(),
                        body: String::new(),
                        before: previous.clone(),
                        line: i + 1,
                    };
                    open = Some((fence, block));
                } else {
                    prose.push((i + 1, bare.to_string()));
                }
            }
        }
        previous = bare.to_string();
    }
    assert!(open.is_none(), "a fenced block is never closed");
    (out, prose)
}

/// What a marker line says: `example` and the path, or `fragment` and why.
fn marker(line: &str) -> Option<(&str, &str)> {
    let inner = line
        .trim()
        .strip_prefix("<!--")?
        .strip_suffix("-->")?
        .trim();
    let (kind, rest) = inner.split_once(':')?;
    let kind = kind.trim();
    (kind == "example" || kind == "fragment").then_some((kind, rest.trim()))
}

/// What is wrong with the examples of one Markdown file.
fn example_problems(name: &str, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let (blocks, prose) = blocks(text);
    let client_code = ["html", "js", "mjs", "javascript", "python", "py"];
    for b in &blocks {
        let lang = b.info.split_whitespace().next().unwrap_or("");
        match marker(&b.before) {
            Some(("example", path)) => {
                let file = root().join(path);
                match std::fs::read_to_string(&file) {
                    Err(e) => problems.push(format!(
                        "{name}:{}: the example marker names {path}, which cannot be read ({e})",
                        b.line
                    )),
                    Ok(content) if content != b.body => problems.push(format!(
                        "{name}:{}: the block differs from {path}; paste the file in whole \
                         (first differing line: {:?})",
                        b.line,
                        first_difference(&b.body, &content)
                    )),
                    Ok(_) => {}
                }
            }
            Some((_, "")) => problems.push(format!(
                "{name}:{}: a fragment marker says why the block is not a program",
                b.line
            )),
            Some(_) => {}
            None if client_code.contains(&lang) => problems.push(format!(
                "{name}:{}: a ```{lang} block without a marker: put it in docs/examples/ and \
                 mark it <!-- example: docs/examples/FILE -->, or mark it \
                 <!-- fragment: WHY --> if it is not a program",
                b.line
            )),
            None => {}
        }
    }
    // A marker must stand right before a fence: one before prose marks nothing.
    let fences: HashSet<usize> = blocks.iter().map(|b| b.line).collect();
    for (line, text) in &prose {
        if marker(text).is_some() && !fences.contains(&(line + 1)) {
            problems.push(format!(
                "{name}:{line}: a marker that stands before no fenced block"
            ));
        }
    }
    problems
}

fn first_difference(shown: &str, file: &str) -> String {
    shown
        .lines()
        .zip(file.lines())
        .find(|(a, b)| a != b)
        .map(|(a, _)| a.to_string())
        .unwrap_or_else(|| "(one is longer)".into())
}

/// GitHub's anchor for a heading: lower case, punctuation dropped (but `-` and `_`), spaces as
/// `-`, inline code and emphasis markers dropped, link targets dropped.
fn slug(heading: &str) -> String {
    let mut text = String::new();
    let mut rest = heading;
    // `[text](target)` counts as its text.
    while let Some(open) = rest.find('[') {
        text.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find("](").zip(after.find(')')) {
            Some((close, end)) if close < end => {
                text.push_str(&after[..close]);
                rest = &after[end + 1..];
            }
            _ => {
                text.push('[');
                rest = after;
            }
        }
    }
    text.push_str(rest);
    text.to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown file's headings, with GitHub's `-1`, `-2` for repeats.
fn anchors(text: &str) -> HashSet<String> {
    let (_, prose) = blocks(text);
    let mut seen = HashSet::new();
    for (_, line) in prose {
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(line[hashes..].trim());
        let mut anchor = base.clone();
        let mut n = 0;
        while !seen.insert(anchor.clone()) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
    }
    seen
}

/// The targets of the inline links and images on one line, outside inline code.
fn link_targets(line: &str) -> Vec<String> {
    // Inline code spans hold example syntax, not links.
    let mut plain = String::new();
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
        } else if !in_code {
            plain.push(c);
        }
    }
    let mut targets = Vec::new();
    let mut rest = plain.as_str();
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let Some(end) = after.find(')') else { break };
        let target = after[..end].split_whitespace().next().unwrap_or("");
        targets.push(target.to_string());
        rest = &after[end + 1..];
    }
    targets
}

/// What is wrong with the links of one Markdown file.
fn link_problems(file: &Path, text: &str) -> Vec<String> {
    let name = rel(file);
    let dir = file.parent().expect("a file's directory");
    let (_, prose) = blocks(text);
    let mut problems = Vec::new();
    for (line_no, line) in prose {
        for target in link_targets(&line) {
            if target.is_empty()
                || target.contains("://")
                || target.starts_with("mailto:")
                || target.starts_with("data:")
            {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let resolved = if path.is_empty() {
                file.to_path_buf()
            } else {
                dir.join(path)
            };
            if !resolved.exists() {
                problems.push(format!("{name}:{line_no}: {target}: no such file"));
                continue;
            }
            if let Some(anchor) = anchor {
                let is_md = resolved.extension().is_some_and(|e| e == "md");
                if is_md && !anchors(&read(&resolved)).contains(anchor) {
                    problems.push(format!(
                        "{name}:{line_no}: {target}: no heading with that anchor"
                    ));
                }
            }
        }
    }
    problems
}

#[test]
fn every_example_shown_is_the_file_that_runs() {
    let mut problems = Vec::new();
    let mut shown = 0;
    for file in doc_files() {
        let text = read(&file);
        shown += text
            .lines()
            .filter(|l| marker(l).is_some_and(|(k, _)| k == "example"))
            .count();
        problems.extend(example_problems(&rel(&file), &text));
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
    // The metronomes in a browser, in Node and in Python, at least.
    assert!(shown >= 3, "only {shown} examples are marked");
}

#[test]
fn every_link_and_anchor_leads_somewhere() {
    let mut problems = Vec::new();
    let mut links = 0;
    for file in doc_files() {
        let text = read(&file);
        links += text.lines().map(|l| link_targets(l).len()).sum::<usize>();
        problems.extend(link_problems(&file, &text));
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
    assert!(
        links > 50,
        "only {links} links found: is the parser broken?"
    );
}

#[test]
fn the_readme_lists_every_document() {
    let readme = read(&root().join("README.md"));
    let listed: HashSet<String> = readme.lines().flat_map(link_targets).collect();
    let missing: Vec<String> = doc_files()
        .iter()
        .map(|f| rel(f))
        .filter(|f| f.starts_with("docs/") && f.matches('/').count() == 1)
        .filter(|f| !listed.contains(f))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md's documentation table does not link {missing:?}"
    );
}

// The checks themselves, on small texts.

#[test]
fn a_marked_block_must_match_its_file_and_its_file_must_exist() {
    let file = read(&root().join("docs/examples/metronome.py"));
    let good = format!("<!-- example: docs/examples/metronome.py -->\n```python\n{file}```\n");
    assert_eq!(example_problems("t.md", &good), Vec::<String>::new());

    let changed = good.replacen("import json", "import json5", 1);
    let problems = example_problems("t.md", &changed);
    assert!(
        problems.len() == 1 && problems[0].contains("differs"),
        "{problems:?}"
    );

    let missing = "<!-- example: docs/examples/nothing.js -->\n```js\nx\n```\n";
    let problems = example_problems("t.md", missing);
    assert!(
        problems.len() == 1 && problems[0].contains("cannot be read"),
        "{problems:?}"
    );
}

#[test]
fn client_code_needs_a_marker_and_a_marker_needs_a_block() {
    let unmarked = "Some text.\n\n```js\nconst c = new Conductor();\n```\n";
    let problems = example_problems("t.md", unmarked);
    assert!(
        problems.len() == 1 && problems[0].contains("without a marker"),
        "{problems:?}"
    );
    let fragment = "<!-- fragment: a message's shape -->\n```js\n{\"event\":\"stop\"}\n```\n";
    assert_eq!(example_problems("t.md", fragment), Vec::<String>::new());
    let shell = "```sh\ncargo run --release\n```\n";
    assert_eq!(example_problems("t.md", shell), Vec::<String>::new());
    let stray = "<!-- example: docs/examples/metronome.py -->\n\n```python\nx\n```\n";
    let problems = example_problems("t.md", stray);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("stands before no fenced block")),
        "{problems:?}"
    );
}

#[test]
fn anchors_follow_githubs_rules() {
    assert_eq!(
        slug("In a browser: `conductor.js`"),
        "in-a-browser-conductorjs"
    );
    assert_eq!(
        slug("What round trips cannot see: asymmetry"),
        "what-round-trips-cannot-see-asymmetry"
    );
    assert_eq!(slug("`/ws` beside `/socket.io/`"), "ws-beside-socketio");
    assert_eq!(
        slug("D1 (high): a timeline from Redis could silence every instance"),
        "d1-high-a-timeline-from-redis-could-silence-every-instance"
    );
    let text = "# A\n## Notes\n```sh\n# not a heading\n```\n## Notes\n";
    let found = anchors(text);
    assert!(
        found.contains("notes") && found.contains("notes-1") && !found.contains("not-a-heading")
    );
    assert_eq!(
        link_targets("see [x](a.md#b) and `[y](c.md)` and ![i](p.png)"),
        ["a.md#b", "p.png"]
    );
}
