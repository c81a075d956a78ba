//! Shell-style pattern matching for FIND, with the semantics of the Python server's
//! `fnmatch.fnmatch(lock_id, pattern)` -- on POSIX that is `fnmatch.fnmatchcase`: case-sensitive,
//! no escaping, whole-name match, `/` and leading `.` not special.
//!
//! - `*` matches any run of characters (newlines included), `?` any single character;
//! - `[...]` matches one character from a set with ranges (`a-z`); `[!...]` negates it.
//!   `[^...]` is *not* a negation in fnmatch: `^` is a literal member there;
//! - a `]` right after `[` or `[!` is a member; `[` without a closing `]` is a literal `[`;
//! - a `-` first or last in a set is literal; reversed ranges (`[z-a]`) match nothing (as since
//!   Python 3.9; older Pythons raised an error); `[!]` without a later `]` is literal text;
//! - characters are Unicode scalar values, as Python compares `str`: `?` matches `é` (two
//!   bytes). Bytes that are not valid UTF-8 count as one character each and only match
//!   themselves (or wildcards).
//!
//! Matching is iterative with single-star backtracking: O(pattern x name) worst case, no
//! recursion, no exponential blowup. `Glob::matches_counting` also reports the steps taken, so
//! a FIND/LIST scan can bound its work per loop turn.

/// A compiled pattern, for matching many names (FIND and LIST walk every lock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    tokens: Vec<Token>,
    /// Inclusive code point ranges of all sets; a set refers to a slice of these.
    ranges: Vec<(u32, u32)>,
    /// What in the pattern is most likely a mistake (fnmatch accepts it).
    problem: Option<&'static str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Literal(u32),
    Any,
    Star,
    Set {
        start: usize,
        end: usize,
        negated: bool,
    },
}

/// Value given to a byte that does not start a valid UTF-8 sequence: beyond every `char`, so it
/// only equals the same invalid byte.
const INVALID_BASE: u32 = 0x11_0000;

/// Decodes the character at `s[i]` (`i < s.len()`): its value and its length in bytes.
fn decode_at(s: &[u8], i: usize) -> (u32, usize) {
    let b = s[i];
    let width = match b {
        0x00..=0x7f => return (u32::from(b), 1),
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => 0,
    };
    if let Some(Ok(text)) = s.get(i..i + width).map(std::str::from_utf8) {
        if let Some(c) = text.chars().next() {
            return (u32::from(c), width);
        }
    }
    (INVALID_BASE + u32::from(b), 1)
}

const STAR: u32 = '*' as u32;
const QUESTION: u32 = '?' as u32;
const OPEN: u32 = '[' as u32;
const CLOSE: u32 = ']' as u32;
const BANG: u32 = '!' as u32;
const DASH: u32 = '-' as u32;

impl Glob {
    /// Compiles `pattern` following `fnmatch.translate` (Python 3.9+) step by step.
    pub fn new(pattern: &[u8]) -> Glob {
        let mut pat = Vec::with_capacity(pattern.len());
        let mut i = 0;
        while i < pattern.len() {
            let (c, width) = decode_at(pattern, i);
            pat.push(c);
            i += width;
        }
        let mut glob = Glob {
            tokens: Vec::with_capacity(pat.len()),
            ranges: Vec::new(),
            problem: None,
        };
        let n = pat.len();
        let mut i = 0;
        while i < n {
            let c = pat[i];
            i += 1;
            match c {
                STAR => {
                    // Consecutive stars are one.
                    if glob.tokens.last() != Some(&Token::Star) {
                        glob.tokens.push(Token::Star);
                    }
                }
                QUESTION => glob.tokens.push(Token::Any),
                OPEN => {
                    let mut j = i;
                    if j < n && pat[j] == BANG {
                        j += 1;
                    }
                    if j < n && pat[j] == CLOSE {
                        j += 1;
                    }
                    while j < n && pat[j] != CLOSE {
                        j += 1;
                    }
                    if j >= n {
                        glob.tokens.push(Token::Literal(OPEN));
                        glob.problem.get_or_insert(
                            "a `[` without its `]` (it would match a literal `[`: write `[[]` for that)",
                        );
                    } else {
                        glob.push_set(&pat, i, j);
                        i = j + 1;
                    }
                }
                _ => glob.tokens.push(Token::Literal(c)),
            }
        }
        glob
    }

    /// Compiles the set `pat[i..j]` (between `[` and `]`) like `fnmatch.translate` builds its
    /// regex class, then reads that class the way Python's `re` does.
    fn push_set(&mut self, pat: &[u32], i: usize, j: usize) {
        let stuff = &pat[i..j];
        // Chunks separated by the hyphens that form ranges; other hyphens are literal.
        let mut chunks: Vec<Vec<u32>> = Vec::new();
        if !stuff.contains(&DASH) {
            chunks.push(stuff.to_vec());
        } else {
            let mut i = i;
            let mut k = if pat[i] == BANG { i + 2 } else { i + 1 };
            while let Some(hyphen) = (k..j).find(|&x| pat[x] == DASH) {
                chunks.push(pat[i..hyphen].to_vec());
                i = hyphen + 1;
                k = hyphen + 3;
            }
            let chunk = &pat[i..j];
            if !chunk.is_empty() {
                chunks.push(chunk.to_vec());
            } else if let Some(last) = chunks.last_mut() {
                last.push(DASH);
            }
            // Remove empty (reversed) ranges, dropping both ends.
            for k in (1..chunks.len()).rev() {
                let (Some(&lo), Some(&hi)) = (chunks[k - 1].last(), chunks[k].first()) else {
                    continue;
                };
                if lo > hi {
                    self.problem
                        .get_or_insert("a reversed range such as `[z-a]` (it matches nothing)");
                    let tail = chunks.remove(k);
                    let prev = &mut chunks[k - 1];
                    prev.pop();
                    prev.extend_from_slice(&tail[1..]);
                }
            }
        }
        // The class body as (character, is a range-forming hyphen).
        let mut body: Vec<(u32, bool)> = Vec::new();
        for (n, chunk) in chunks.iter().enumerate() {
            if n > 0 {
                body.push((DASH, true));
            }
            body.extend(chunk.iter().map(|&c| (c, false)));
        }
        let start = self.ranges.len();
        if body.is_empty() {
            // Empty set: never matches.
            self.tokens.push(Token::Set {
                start,
                end: start,
                negated: false,
            });
            return;
        }
        if body == [(BANG, false)] {
            // Negated empty set: any character.
            self.tokens.push(Token::Any);
            return;
        }
        let negated = body[0] == (BANG, false);
        let items = if negated { &body[1..] } else { &body[..] };
        let mut x = 0;
        while x < items.len() {
            let lo = items[x].0;
            if x + 2 < items.len() && items[x + 1].1 {
                let hi = items[x + 2].0;
                // Python's re rejects a reversed range; none survives the removal above.
                if lo <= hi {
                    self.ranges.push((lo, hi));
                }
                x += 3;
            } else {
                self.ranges.push((lo, lo));
                x += 1;
            }
        }
        self.tokens.push(Token::Set {
            start,
            end: self.ranges.len(),
            negated,
        });
    }

    fn token_matches(&self, token: Token, c: u32) -> bool {
        match token {
            Token::Literal(l) => l == c,
            Token::Any => true,
            Token::Set {
                start,
                end,
                negated,
            } => {
                let found = self.ranges[start..end]
                    .iter()
                    .any(|&(lo, hi)| lo <= c && c <= hi);
                found != negated
            }
            Token::Star => false,
        }
    }

    /// What in the pattern is most likely a mistake, though fnmatch (and
    /// so FIND) accepts it: a `[` never closed, a reversed range. The
    /// `livelock list` command refuses such a pattern rather than print
    /// an empty list.
    pub fn problem(&self) -> Option<&'static str> {
        self.problem
    }

    /// True when the whole `name` matches the pattern.
    pub fn matches(&self, name: &[u8]) -> bool {
        self.matches_counting(name).0
    }

    /// Whether the whole `name` matches, and the work it took: one per
    /// step of the matcher, plus the ranges a set compared. At most about
    /// pattern length × name length; a scan charges it to its slice
    /// (`LockTable::scan_slice`).
    pub fn matches_counting(&self, name: &[u8]) -> (bool, usize) {
        let tokens = &self.tokens[..];
        let (mut p, mut n) = (0, 0);
        let mut work = 0usize;
        // Token index after the last star seen, and the name offset that star resumes from.
        let mut backtrack: Option<(usize, usize)> = None;
        loop {
            work += 1;
            if let Some(&token) = tokens.get(p) {
                if token == Token::Star {
                    if p + 1 == tokens.len() {
                        return (true, work); // a trailing star takes the rest
                    }
                    p += 1;
                    backtrack = Some((p, n));
                    continue;
                }
                if n < name.len() {
                    let (c, width) = decode_at(name, n);
                    if let Token::Set { start, end, .. } = token {
                        work += end - start;
                    }
                    if self.token_matches(token, c) {
                        p += 1;
                        n += width;
                        continue;
                    }
                }
            } else if n == name.len() {
                return (true, work);
            }
            // Mismatch: let the last star swallow one more character and retry after it.
            match backtrack {
                Some((after_star, from)) if from < name.len() => {
                    let from = from + decode_at(name, from).1;
                    backtrack = Some((after_star, from));
                    p = after_star;
                    n = from;
                }
                _ => return (false, work),
            }
        }
    }
}

/// True when the whole `name` matches `pattern` (compiles the pattern each call; use [`Glob`] to
/// match many names).
pub fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    Glob::new(pattern).matches(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn m(pattern: &str, name: &str) -> bool {
        glob_match(pattern.as_bytes(), name.as_bytes())
    }

    #[test]
    fn literals_and_wildcards() {
        assert!(m("", ""));
        assert!(!m("", "a"));
        assert!(m("abc", "abc"));
        assert!(!m("abc", "abd"));
        assert!(!m("abc", "ab"));
        assert!(!m("ab", "abc"));
        assert!(m("ABC", "ABC"));
        assert!(!m("abc", "ABC")); // case-sensitive
        assert!(m("*", ""));
        assert!(m("*", "anything at all"));
        assert!(m("**", "x"));
        assert!(m("a*", "a"));
        assert!(m("a*", "abc"));
        assert!(!m("a*", "ba"));
        assert!(m("*c", "abc"));
        assert!(m("a*c", "ac"));
        assert!(m("a*c", "abbbc"));
        assert!(!m("a*c", "abbb"));
        assert!(m("a*b*c", "aXbYc"));
        assert!(m("a*b*c", "abcbc"));
        assert!(!m("a*b*c", "acb"));
        assert!(m("?", "x"));
        assert!(!m("?", ""));
        assert!(!m("?", "xy"));
        assert!(m("a?c", "abc"));
        assert!(m("*?", "a"));
        assert!(!m("*?", ""));
        assert!(m("?*?", "ab"));
        assert!(!m("?*?", "a"));
        // Newlines are ordinary characters ((?s) in the regex).
        assert!(m("a*b", "a\n\nb"));
        assert!(m("a?b", "a\nb"));
        // No escaping: backslash is literal; `/` and `.` are not special.
        assert!(m("a\\*", "a\\xyz"));
        assert!(!m("a\\*", "a*"));
        assert!(m("*", ".hidden"));
        assert!(m("a*", "a/b/c"));
        assert!(m("lock:*:1", "lock:x:y:1"));
    }

    #[test]
    fn sets() {
        assert!(m("[abc]", "b"));
        assert!(!m("[abc]", "d"));
        assert!(m("[a-c]x", "bx"));
        assert!(!m("[a-c]x", "dx"));
        assert!(m("[!a-c]", "d"));
        assert!(!m("[!a-c]", "b"));
        assert!(!m("[!a]", ""));
        assert!(m("[a-cx-z]", "y"));
        assert!(!m("[a-cx-z]", "m"));
        // `^` is not a negation in fnmatch.
        assert!(m("[^a]", "^"));
        assert!(m("[^a]", "a"));
        assert!(!m("[^a]", "b"));
        // `]` first is a member.
        assert!(m("[]]", "]"));
        assert!(m("[]a]", "a"));
        assert!(m("[!]]", "a"));
        assert!(!m("[!]]", "]"));
        assert!(m("[]-a]", "^")); // range ']'..'a'
                                  // Hyphens first/last are literal.
        assert!(m("[-a]", "-"));
        assert!(m("[a-]", "-"));
        assert!(m("[!-a]", "b"));
        assert!(!m("[!-a]", "-"));
        assert!(m("[a-b-c]", "-"));
        assert!(m("[a-b-c]", "c"));
        assert!(!m("[a-b-c]", "d"));
        assert!(m("[--0]", "."));
        // Reversed ranges match nothing; `[!z-a]` matches anything.
        assert!(!m("[z-a]", "m"));
        assert!(!m("[z-a]", "z"));
        assert!(m("[!z-a]", "m"));
        assert!(m("[z-ab]", "b"));
        assert!(!m("[z-ab]", "z"));
        assert!(m("[c-b!x]", "y")); // merging reversed range leaves "!x": negation
        assert!(!m("[c-b!x]", "x"));
        // Unclosed `[` is literal.
        assert!(m("[", "["));
        assert!(m("[abc", "[abc"));
        assert!(m("[!]", "[!]"));
        assert!(m("[]", "[]"));
        assert!(m("a[", "a["));
        // Other regex specials are literal members.
        assert!(m("[\\]", "\\"));
        assert!(m("[&&]", "&"));
        assert!(m("[[]", "["));
        assert!(m("[.]", "."));
        assert!(!m("[.]", "x"));
        assert!(m("[[:alpha:]]", "a]"));
    }

    #[test]
    fn unicode() {
        assert!(m("?", "é"));
        assert!(m("??", "日本"));
        assert!(!m("?", "日本"));
        assert!(m("[à-ÿ]", "é"));
        assert!(m("[!é]", "e"));
        assert!(!m("[!é]", "é"));
        assert!(m("*本", "日本"));
        assert!(m("日*", "日本語"));
        // Invalid UTF-8: one character per byte, equal only to itself.
        assert!(glob_match(b"?", b"\xff"));
        assert!(glob_match(b"\xff*", b"\xffabc"));
        assert!(!glob_match("é".as_bytes(), b"\xe9"));
        assert!(glob_match(b"a?c", b"a\xc3c"));
        assert!(glob_match(b"[\xff]", b"\xff"));
    }

    #[test]
    fn compiled_reuse() {
        let glob = Glob::new(b"lock-[0-9]*");
        assert!(glob.matches(b"lock-1"));
        assert!(glob.matches(b"lock-42x"));
        assert!(!glob.matches(b"lock-x"));
        assert!(!glob.matches(b"other"));
    }

    #[test]
    fn counted_work_is_bounded_by_pattern_times_name() {
        let name = [b'a'; 80];
        let cases = [
            ("*".to_string() + &"a".repeat(1022) + "b", false),
            ("*a".repeat(50) + "*b", false),
            ("*[a-z]".repeat(30), true),
            ("x*".to_string(), false),
            ("*".to_string(), true),
        ];
        for (pattern, expected) in cases {
            let glob = Glob::new(pattern.as_bytes());
            let (matched, work) = glob.matches_counting(&name);
            assert_eq!(matched, expected, "{pattern}");
            assert_eq!(matched, glob.matches(&name));
            let bound = (pattern.len() + 1) * (name.len() + 1) * 2;
            assert!(work >= 1 && work <= bound, "{pattern}: {work} > {bound}");
        }
        // A mismatch on the first character costs a step or two.
        assert!(Glob::new(b"x*").matches_counting(&name).1 <= 2);
        // The worst case of the scan test (tests/scans.rs) costs thousands.
        let worst = Glob::new(("*".to_string() + &"a".repeat(1022) + "b").as_bytes());
        assert!(worst.matches_counting(&name).1 > 3000);
    }

    #[test]
    fn pathological_inputs_are_fast() {
        let start = Instant::now();
        let name = vec![b'a'; 10_000];
        let pattern = "*a".repeat(50) + "*b";
        assert!(!glob_match(pattern.as_bytes(), &name));
        let pattern = "*a".repeat(50) + "*";
        assert!(glob_match(pattern.as_bytes(), &name));
        let pattern = "*?".repeat(40) + "b";
        assert!(!glob_match(pattern.as_bytes(), &name));
        let mut long = vec![b'a'; 5_000];
        long.push(b'b');
        let pattern = "*".to_string() + &"a".repeat(1000) + "b";
        assert!(glob_match(pattern.as_bytes(), &long));
        let pattern = "*[a]*[!b]*[a-a]".repeat(20) + "c";
        assert!(!glob_match(pattern.as_bytes(), &name));
        assert!(glob_match(&vec![b'*'; 100_000], b""));
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn likely_mistakes_are_named() {
        assert!(Glob::new(b"job-*").problem().is_none());
        assert!(Glob::new(b"[a-z]*").problem().is_none());
        assert!(Glob::new(b"[[]x").problem().is_none());
        assert!(Glob::new(b"job-[12")
            .problem()
            .unwrap()
            .contains("without its `]`"));
        assert!(Glob::new(b"[z-a]*")
            .problem()
            .unwrap()
            .contains("reversed range"));
        // Still matched the fnmatch way.
        assert!(Glob::new(b"job-[12").matches(b"job-[12"));
        assert!(!Glob::new(b"[z-a]*").matches(b"z"));
    }
}
