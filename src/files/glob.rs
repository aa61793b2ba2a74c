//! File-name patterns of `/files/search`, matched against a base name as execd matches them:
//! `*` and `?` (never across `/`), `**`, classes `[abc]` `[a-z]` `[!x]` `[^x]`, alternatives
//! `{a,b}` (nesting), `\` escapes, and a whole-pattern negation `!(p|q)`.

#[derive(Debug, PartialEq, Eq)]
pub struct Pattern {
    alternatives: Vec<Vec<char>>,
    negated: bool,
}

impl Pattern {
    pub fn parse(pattern: &str) -> Result<Pattern, String> {
        let bad = |why: &str| format!("invalid pattern {pattern:?}: {why}");
        if pattern.contains('\0') {
            return Err(bad("it contains NUL"));
        }
        let (body, negated) = match pattern.strip_prefix('!') {
            Some(rest) => {
                let inner = rest
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| bad("a negation is written !(pattern)"))?;
                (inner, true)
            }
            None => (pattern, false),
        };
        let alternatives: Vec<Vec<char>> = if negated {
            split_top(&body.chars().collect::<Vec<_>>(), '|')
        } else {
            vec![body.chars().collect()]
        };
        for alternative in &alternatives {
            check(alternative).map_err(&bad)?;
        }
        Ok(Pattern {
            alternatives,
            negated,
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        let name: Vec<char> = name.chars().collect();
        let any = self.alternatives.iter().any(|p| matches(p, &name));
        any != self.negated
    }
}

/// Syntax errors: unclosed classes and braces, a trailing escape.
fn check(p: &[char]) -> Result<(), &'static str> {
    let mut i = 0;
    let mut braces = 0usize;
    while i < p.len() {
        match p[i] {
            '\\' if i + 1 == p.len() => return Err("ends with an escape"),
            '\\' => i += 1,
            '[' => i = class_end(p, i).ok_or("unclosed [")?,
            '{' => braces += 1,
            '}' if braces == 0 => return Err("unopened }"),
            '}' => braces -= 1,
            _ => {}
        }
        i += 1;
    }
    if braces > 0 {
        return Err("unclosed {");
    }
    Ok(())
}

fn matches(p: &[char], s: &[char]) -> bool {
    let Some(&first) = p.first() else {
        return s.is_empty();
    };
    match first {
        // `**/` also stands for no directory at all.
        '*' if p.starts_with(&['*', '*', '/']) && matches(&p[3..], s) => true,
        '*' => {
            let rest = {
                let mut r = &p[1..];
                while r.first() == Some(&'*') {
                    r = &r[1..];
                }
                r
            };
            (0..=s.len()).any(|skip| matches(rest, &s[skip..]))
        }
        '?' => !s.is_empty() && s[0] != '/' && matches(&p[1..], &s[1..]),
        '[' => {
            let end = class_end(p, 0).expect("checked at parse");
            !s.is_empty() && class_matches(&p[1..end], s[0]) && matches(&p[end + 1..], &s[1..])
        }
        '{' => {
            let end = brace_end(p, 0).expect("checked at parse");
            let rest = &p[end + 1..];
            split_top(&p[1..end], ',').into_iter().any(|alt| {
                let mut joined = alt;
                joined.extend_from_slice(rest);
                matches(&joined, s)
            })
        }
        '\\' => !s.is_empty() && s[0] == p[1] && matches(&p[2..], &s[1..]),
        c => !s.is_empty() && s[0] == c && matches(&p[1..], &s[1..]),
    }
}

/// Index of the `]` closing the class opened at `open`.
fn class_end(p: &[char], open: usize) -> Option<usize> {
    let mut i = open + 1;
    if matches!(p.get(i), Some('!' | '^')) {
        i += 1;
    }
    // A `]` first in the class is a member.
    if p.get(i) == Some(&']') {
        i += 1;
    }
    while i < p.len() {
        match p[i] {
            '\\' => i += 2,
            ']' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

fn class_matches(class: &[char], c: char) -> bool {
    let (negated, mut items) = match class.first() {
        Some('!' | '^') => (true, &class[1..]),
        _ => (false, class),
    };
    let mut hit = false;
    while let Some(&first) = items.first() {
        let (low, used) = if first == '\\' && items.len() > 1 {
            (items[1], 2)
        } else {
            (first, 1)
        };
        items = &items[used..];
        if items.len() >= 2 && items[0] == '-' {
            let (high, used) = if items[1] == '\\' && items.len() > 2 {
                (items[2], 3)
            } else {
                (items[1], 2)
            };
            items = &items[used..];
            hit |= low <= c && c <= high;
        } else {
            hit |= low == c;
        }
    }
    hit != negated
}

fn brace_end(p: &[char], open: usize) -> Option<usize> {
    let mut depth = 0;
    let mut i = open;
    while i < p.len() {
        match p[i] {
            '\\' => i += 1,
            '[' => i = class_end(p, i)?,
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Splits at `sep` outside braces, classes and escapes.
fn split_top(p: &[char], sep: char) -> Vec<Vec<char>> {
    let mut parts = vec![Vec::new()];
    let mut depth = 0;
    let mut i = 0;
    while i < p.len() {
        let c = p[i];
        match c {
            '\\' if i + 1 < p.len() => {
                parts.last_mut().unwrap().extend_from_slice(&p[i..i + 2]);
                i += 2;
                continue;
            }
            '[' => {
                if let Some(end) = class_end(p, i) {
                    parts.last_mut().unwrap().extend_from_slice(&p[i..=end]);
                    i = end + 1;
                    continue;
                }
            }
            '{' => depth += 1,
            '}' => depth -= 1,
            _ if c == sep && depth == 0 => {
                parts.push(Vec::new());
                i += 1;
                continue;
            }
            _ => {}
        }
        parts.last_mut().unwrap().push(c);
        i += 1;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, name: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(name)
    }

    #[test]
    fn base_names_match_as_execd_matches_them() {
        assert!(m("*.txt", "alpha.txt"));
        assert!(!m("*.txt", "beta.log"));
        assert!(m("**", "anything"));
        assert!(m("**/*.py", "x.py"), "**/ matches nothing in a base name");
        assert!(!m("src/*.py", "x.py"));
        assert!(m("?.md", "a.md") && !m("?.md", "ab.md"));
        assert!(m("[ab]*", "beta") && !m("[ab]*", "gamma"));
        assert!(m("[a-c]x", "bx") && !m("[!a-c]x", "bx") && m("[^a-c]x", "dx"));
        assert!(m("[]]", "]"));
        assert!(m("*.{txt,{md,rst}}", "r.rst") && !m("*.{txt,md}", "r.rst"));
        assert!(m("\\*", "*") && !m("\\*", "a"));
        assert!(m("!(*.txt)", "a.log") && !m("!(*.txt)", "a.txt"));
        assert!(!m("!(*.txt|*.log)", "a.log") && m("!(*.txt|*.log)", "a.md"));
        assert!(m("naïve*", "naïve file"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["[abc", "{a,b", "a}", "!", "!x", "x\\"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }
}
