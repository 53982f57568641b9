//! nginx configuration syntax, as `ngx_conf_file.c` reads it: directives of words ended
//! by `;`, blocks in `{ }`, `#` comments, single- and double-quoted strings with
//! backslash escapes, `${var}` inside words, and `include` (relative to the directory of
//! the main file, nginx's configuration prefix, with `*` globs in the file name).
//!
//! The lexer is nom; the block structure is a small recursive descent over its tokens,
//! so that every error carries the file and line nginx would report.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nom::IResult;
use nom::branch::alt;
use nom::bytes::complete::{is_not, take_while1};
use nom::character::complete::{char, multispace1};
use nom::combinator::{map, recognize, value};
use nom::multi::many0_count;
use nom::sequence::pair;

/// Where a directive was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    /// The file, as it was named (the main file's path, or the include's resolved path).
    pub file: Arc<Path>,
    /// 1-based line.
    pub line: usize,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// One argument of a directive, escapes resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    /// The text.
    pub value: String,
    /// Written in quotes.
    pub quoted: bool,
}

impl Arg {
    /// True when the argument refers to an nginx variable (`$name`, `${name}`).
    pub fn has_variable(&self) -> bool {
        let b = self.value.as_bytes();
        b.windows(2)
            .any(|w| w[0] == b'$' && (w[1].is_ascii_alphabetic() || w[1] == b'_' || w[1] == b'{'))
    }
}

/// A directive: a name, its arguments and, for block directives, its children.
#[derive(Debug, Clone)]
pub struct Directive {
    /// The directive's name (`listen`, `server`, ...).
    pub name: String,
    /// Its arguments.
    pub args: Vec<Arg>,
    /// The block's directives (`mail { ... }`), `None` for `name args;`.
    pub block: Option<Vec<Directive>>,
    /// Where it was written.
    pub loc: Loc,
}

impl Directive {
    /// The first argument, or "".
    pub fn arg(&self, i: usize) -> &str {
        self.args.get(i).map_or("", |a| a.value.as_str())
    }
}

/// A syntax error, or an include that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// File and line; the line is 0 when the file itself cannot be read.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// What is wrong, in nginx's words where it has some.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
        }
    }
}

impl std::error::Error for ParseError {}

/// Deepest include nesting; nginx has no limit but loops forever on a cycle.
const MAX_INCLUDE_DEPTH: usize = 16;
/// Largest configuration file read.
const MAX_FILE: u64 = 16 << 20;

/// Reads `path` and every file it includes.
pub fn parse_file(path: &Path) -> Result<Vec<Directive>, ParseError> {
    let prefix = path.parent().unwrap_or(Path::new("")).to_path_buf();
    let mut stack = Vec::new();
    load(path, None, &prefix, &mut stack)
}

/// Parses configuration text (includes resolved against `prefix`); `name` labels errors.
pub fn parse_str(text: &str, name: &Path, prefix: &Path) -> Result<Vec<Directive>, ParseError> {
    let file: Arc<Path> = Arc::from(name);
    let mut stack = vec![name.to_path_buf()];
    let directives = parse_text(text, &file)?;
    expand(directives, prefix, &mut stack)
}

fn load(
    path: &Path,
    from: Option<&Loc>,
    prefix: &Path,
    stack: &mut Vec<PathBuf>,
) -> Result<Vec<Directive>, ParseError> {
    let fail = |message: String| match from {
        Some(loc) => ParseError {
            file: loc.file.to_path_buf(),
            line: loc.line,
            message,
        },
        None => ParseError {
            file: path.to_path_buf(),
            line: 0,
            message,
        },
    };
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if stack.contains(&canonical) {
        return Err(fail(format!(
            "include cycle: {} includes itself",
            path.display()
        )));
    }
    if stack.len() >= MAX_INCLUDE_DEPTH {
        return Err(fail(format!(
            "includes nested deeper than {MAX_INCLUDE_DEPTH} levels"
        )));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_FILE => {
            return Err(fail(format!(
                "{}: larger than {} MiB",
                path.display(),
                MAX_FILE >> 20
            )));
        }
        Ok(_) => {}
        Err(e) => return Err(fail(format!("cannot read {}: {e}", path.display()))),
    }
    let bytes =
        std::fs::read(path).map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| fail(format!("{}: not UTF-8 text ({e})", path.display())))?;
    let file: Arc<Path> = Arc::from(path);
    let directives = parse_text(&text, &file)?;
    stack.push(canonical);
    let out = expand(directives, prefix, stack);
    stack.pop();
    out
}

/// Replaces `include` directives by the directives of the files they name.
fn expand(
    directives: Vec<Directive>,
    prefix: &Path,
    stack: &mut Vec<PathBuf>,
) -> Result<Vec<Directive>, ParseError> {
    let mut out = Vec::with_capacity(directives.len());
    for mut d in directives {
        if d.name == "include" && d.block.is_none() {
            if d.args.len() != 1 {
                return Err(ParseError {
                    file: d.loc.file.to_path_buf(),
                    line: d.loc.line,
                    message: "invalid number of arguments in \"include\" directive".into(),
                });
            }
            for path in include_paths(d.arg(0), prefix, &d.loc)? {
                out.extend(load(&path, Some(&d.loc), prefix, stack)?);
            }
            continue;
        }
        if let Some(block) = d.block.take() {
            d.block = Some(expand(block, prefix, stack)?);
        }
        out.push(d);
    }
    Ok(out)
}

/// The files an `include` names: relative to nginx's configuration prefix (the main
/// file's directory), or failing that to the including file's directory; `*` and `?`
/// in the last component match like a shell glob, sorted, and may match nothing.
fn include_paths(pattern: &str, prefix: &Path, loc: &Loc) -> Result<Vec<PathBuf>, ParseError> {
    let raw = Path::new(pattern);
    let candidates: Vec<PathBuf> = if raw.is_absolute() {
        vec![raw.to_path_buf()]
    } else {
        let mut c = vec![prefix.join(raw)];
        if let Some(dir) = loc.file.parent() {
            let alt = dir.join(raw);
            if alt != c[0] {
                c.push(alt);
            }
        }
        c
    };
    let is_glob = pattern.contains(['*', '?', '[']);
    if !is_glob {
        return match candidates.iter().find(|p| p.exists()) {
            Some(p) => Ok(vec![p.clone()]),
            None => Err(ParseError {
                file: loc.file.to_path_buf(),
                line: loc.line,
                message: format!(
                    "include \"{pattern}\": no such file (looked for {})",
                    candidates
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
            }),
        };
    }
    for candidate in &candidates {
        let (Some(dir), Some(name)) = (candidate.parent(), candidate.file_name()) else {
            continue;
        };
        let name = name.to_string_lossy();
        if dir.to_string_lossy().contains(['*', '?', '[']) {
            return Err(ParseError {
                file: loc.file.to_path_buf(),
                line: loc.line,
                message: format!(
                    "include \"{pattern}\": wildcards are supported in the file name only"
                ),
            });
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                !n.starts_with('.') && glob_match(name.as_bytes(), n.as_bytes())
            })
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        if !found.is_empty() {
            found.sort();
            return Ok(found);
        }
    }
    Ok(Vec::new())
}

/// `*` (any run) and `?` (one byte) matching; other bytes literally.
fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob_match(&pattern[1..], name) || (!name.is_empty() && glob_match(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => glob_match(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => glob_match(&pattern[1..], &name[1..]),
        _ => false,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Word(Arg),
    Semi,
    Open,
    Close,
}

/// White space and `#` comments.
fn blank(input: &str) -> IResult<&str, usize> {
    many0_count(alt((
        value((), multispace1),
        value(
            (),
            recognize(pair(char('#'), nom::combinator::opt(is_not("\n")))),
        ),
    )))(input)
}

fn punct(input: &str) -> IResult<&str, Tok> {
    alt((
        value(Tok::Semi, char(';')),
        value(Tok::Open, char('{')),
        value(Tok::Close, char('}')),
    ))(input)
}

/// nginx's escapes: `\"`, `\'`, `\\`, `\t`, `\r`, `\n`; any other `\x` stays as written
/// (regular expressions keep their backslashes).
fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('"') => out.push('"'),
            Some('\'') => out.push('\''),
            Some('\\') => out.push('\\'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// The raw body of a quoted string (escapes not yet resolved), quote excluded.
fn quoted_body(quote: char) -> impl Fn(&str) -> IResult<&str, &str> {
    move |input: &str| {
        let mut escaped = false;
        for (i, c) in input.char_indices() {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == quote {
                return Ok((&input[i..], &input[..i]));
            }
        }
        Err(nom::Err::Error(nom::error::Error::new(
            input,
            nom::error::ErrorKind::Char,
        )))
    }
}

fn quoted(input: &str) -> IResult<&str, Tok> {
    alt((
        map(
            nom::sequence::delimited(char('"'), quoted_body('"'), char('"')),
            |s: &str| {
                Tok::Word(Arg {
                    value: unescape(s),
                    quoted: true,
                })
            },
        ),
        map(
            nom::sequence::delimited(char('\''), quoted_body('\''), char('\'')),
            |s: &str| {
                Tok::Word(Arg {
                    value: unescape(s),
                    quoted: true,
                })
            },
        ),
    ))(input)
}

/// An unquoted word: up to white space, `;` or `{` (except the `{` of `${`); `\`
/// escapes the next character.
fn bare(input: &str) -> IResult<&str, Tok> {
    let mut end = input.len();
    let mut escaped = false;
    let mut dollar = false;
    for (i, c) in input.char_indices() {
        if escaped {
            escaped = false;
            dollar = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '{' if dollar => {}
            ' ' | '\t' | '\r' | '\n' | ';' | '{' => {
                end = i;
                break;
            }
            _ => {}
        }
        dollar = c == '$';
    }
    let (word, rest) = input.split_at(end);
    let (_, word) = take_while1(|_| true)(word)?;
    Ok((
        rest,
        Tok::Word(Arg {
            value: unescape(word),
            quoted: false,
        }),
    ))
}

/// Lexes the whole text into tokens with their line numbers.
fn tokens(text: &str, file: &Arc<Path>) -> Result<Vec<(Tok, usize)>, ParseError> {
    let line_of = |rest: &str| {
        let offset = text.len() - rest.len();
        text.as_bytes()
            .get(..offset)
            .map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
            + 1
    };
    let err = |rest: &str, message: String| ParseError {
        file: file.to_path_buf(),
        line: line_of(rest),
        message,
    };
    let mut out = Vec::new();
    let mut rest = text;
    loop {
        rest = match blank(rest) {
            Ok((r, _)) => r,
            Err(_) => rest,
        };
        if rest.is_empty() {
            return Ok(out);
        }
        let line = line_of(rest);
        let start = rest;
        let parsed = if rest.starts_with(['"', '\'']) {
            quoted(rest).map_err(|_| {
                err(
                    start,
                    "unexpected end of file, expecting closing quote".into(),
                )
            })?
        } else {
            match punct(rest) {
                Ok(p) => p,
                Err(_) => bare(rest).map_err(|_| err(start, "unexpected character".into()))?,
            }
        };
        let (r, tok) = parsed;
        // A quoted string must be followed by white space, ';', '{' or the end.
        if matches!(&tok, Tok::Word(a) if a.quoted)
            && let Some(c) = r.chars().next()
            && !(c.is_whitespace() || c == ';' || c == '{' || c == '}')
        {
            return Err(err(r, format!("unexpected \"{c}\" after a quoted string")));
        }
        out.push((tok, line));
        rest = r;
    }
}

fn parse_text(text: &str, file: &Arc<Path>) -> Result<Vec<Directive>, ParseError> {
    let toks = tokens(text, file)?;
    let mut pos = 0;
    let out = block(&toks, &mut pos, file, None)?;
    Ok(out)
}

/// Directives up to the matching `}` (or the end of file at top level).
fn block(
    toks: &[(Tok, usize)],
    pos: &mut usize,
    file: &Arc<Path>,
    opened_at: Option<usize>,
) -> Result<Vec<Directive>, ParseError> {
    let err = |line: usize, message: String| ParseError {
        file: file.to_path_buf(),
        line,
        message,
    };
    let last_line = toks.last().map_or(1, |t| t.1);
    let mut out = Vec::new();
    loop {
        let Some((tok, line)) = toks.get(*pos) else {
            return match opened_at {
                None => Ok(out),
                Some(open) => Err(err(
                    last_line,
                    format!(
                        "unexpected end of file, expecting \"}}\" (block opened on line {open})"
                    ),
                )),
            };
        };
        *pos += 1;
        let (name, line) = match tok {
            Tok::Close => {
                return match opened_at {
                    Some(_) => Ok(out),
                    None => Err(err(*line, "unexpected \"}\"".into())),
                };
            }
            Tok::Semi => return Err(err(*line, "unexpected \";\"".into())),
            Tok::Open => return Err(err(*line, "unexpected \"{\"".into())),
            Tok::Word(a) => (a.value.clone(), *line),
        };
        let mut args = Vec::new();
        loop {
            let Some((tok, l)) = toks.get(*pos) else {
                return Err(err(
                    last_line,
                    format!(
                        "unexpected end of file, expecting \";\" or \"}}\" after \"{name}\" (line {line})"
                    ),
                ));
            };
            *pos += 1;
            match tok {
                Tok::Word(a) => args.push(a.clone()),
                Tok::Semi => {
                    out.push(Directive {
                        name,
                        args,
                        block: None,
                        loc: Loc {
                            file: Arc::clone(file),
                            line,
                        },
                    });
                    break;
                }
                Tok::Open => {
                    let children = block(toks, pos, file, Some(*l))?;
                    out.push(Directive {
                        name,
                        args,
                        block: Some(children),
                        loc: Loc {
                            file: Arc::clone(file),
                            line,
                        },
                    });
                    break;
                }
                Tok::Close => {
                    return Err(err(
                        *l,
                        format!(
                            "unexpected \"}}\": \"{name}\" (line {line}) is not terminated by \";\""
                        ),
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Directive>, ParseError> {
        parse_str(text, Path::new("t.conf"), Path::new("."))
    }

    #[test]
    fn words_quotes_comments_and_blocks() {
        let d = parse(
            "# top\nmail { server_name \"a b\"; # trailing\n  auth_http_header X-Key 'it\\'s';\n  listen 993 ssl; }\n",
        )
        .unwrap_or_default();
        assert_eq!(d.len(), 1);
        let mail = &d[0];
        assert_eq!(mail.name, "mail");
        let block = mail.block.as_deref().unwrap_or_default();
        assert_eq!(block[0].arg(0), "a b");
        assert_eq!(block[1].arg(1), "it's");
        assert_eq!(block[1].loc.line, 3);
        assert_eq!(block[2].args.len(), 2);
    }

    #[test]
    fn variables_and_braces_in_words() {
        let d = parse("set ${x}y \"$v\"; a\\;b c;").unwrap_or_default();
        assert_eq!(d[0].arg(0), "${x}y");
        assert!(d[0].args[0].has_variable() && d[0].args[1].has_variable());
        // `\;` does not end the word; like nginx, only \" \' \\ \t \r \n are unescaped.
        assert_eq!(d[1].name, "a\\;b");
        assert!(!d[1].args[0].has_variable());
    }

    #[test]
    fn errors_carry_lines() {
        let e = parse("mail {\n server {\n  listen 143\n }\n}\n").err();
        assert_eq!(e.as_ref().map(|e| e.line), Some(4), "{e:?}");
        let e = parse("mail {\n listen 1;\n").err();
        assert!(
            e.as_ref()
                .is_some_and(|e| e.message.contains("expecting \"}\"")),
            "{e:?}"
        );
        let e = parse("a;\n}\n").err();
        assert_eq!(e.map(|e| e.line), Some(2));
        let e = parse("a \"open;\n\n").err();
        assert!(e.is_some_and(|e| e.line == 1 && e.message.contains("quote")));
        let e = parse("a \"x\"y;").err();
        assert!(e.is_some_and(|e| e.message.contains("after a quoted string")));
        assert!(parse(";").is_err());
    }

    #[test]
    fn globs() {
        assert!(glob_match(b"*.conf", b"mail.conf"));
        assert!(!glob_match(b"*.conf", b"mail.conf.bak"));
        assert!(glob_match(b"m?il*", b"mail.conf"));
    }
}
