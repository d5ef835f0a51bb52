//! Text to phoneme ids as Piper does it: espeak-ng's IPA phonemes, clause
//! by clause, with Piper's punctuation and sentence splitting, then the
//! voice's `phoneme_id_map` with BOS/EOS and a pad after every phoneme.
//!
//! The reference is `piper-phonemize` (`src/phonemize.cpp`,
//! `src/phoneme_ids.cpp`), which the Piper voices were trained with:
//!
//! 1. espeak-ng phonemizes one clause per call (`espeak_TextToPhonemes`,
//!    IPA); language-switch flags such as `(en)` are removed;
//! 2. the clause's terminator adds punctuation: `.` `?` `!` as is, `,` `:`
//!    `;` followed by a space; others (ellipsis, end of text) nothing;
//! 3. a sentence ends at a sentence terminator (`.` `?` `!`, end of text,
//!    a blank line);
//! 4. each sentence's phonemes are NFD-decomposed, one code point each;
//! 5. ids: `^ _ (p _)* $`; phonemes missing from the map are skipped.
//!
//! Piper builds its own espeak-ng fork, which reports each clause's
//! terminator (`espeak_TextToPhonemesWithTerminator`); released espeak-ng
//! (Debian's 1.51, 1.52) does not have it. When the library lacks it, the
//! terminator is read from the text the clause consumed, as espeak's
//! `ReadClause` found it (checked against the fork on ~8500 sentences).
//!
//! espeak-ng is loaded at run time (`libespeak-ng.so.1`, Debian's
//! `libespeak-ng1`), so building needs nothing and a machine without it
//! gets an error that says what to install. The library has global state:
//! one [`Mutex`] serialises every call.
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::Mutex;

use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};

/// The shared library's names, most specific first.
const LIBRARY_NAMES: &[&str] = &["libespeak-ng.so.1", "libespeak-ng.so", "libespeak-ng.dylib"];

/// `AUDIO_OUTPUT_SYNCHRONOUS`: no audio thread.
const AUDIO_OUTPUT_SYNCHRONOUS: c_int = 2;
/// `espeakINITIALIZE_DONT_EXIT`: a missing data directory is an error, not
/// an exit of the process.
const INITIALIZE_DONT_EXIT: c_int = 0x8000;
/// `espeakCHARS_AUTO`.
const CHARS_AUTO: c_int = 0;
/// `espeakPHONEMES_IPA`.
const PHONEMES_IPA: c_int = 0x02;

// Clause terminators, from espeak-ng's `translate.h` (also in
// piper-phonemize's `phonemize.hpp`).
const INTONATION_COMMA: u32 = 0x1000;
const INTONATION_QUESTION: u32 = 0x2000;
const INTONATION_EXCLAMATION: u32 = 0x3000;
const TYPE_EOF: u32 = 0x10000;
const TYPE_CLAUSE: u32 = 0x40000;
const TYPE_SENTENCE: u32 = 0x80000;
const CLAUSE_PERIOD: u32 = 40 | TYPE_SENTENCE;
const CLAUSE_COMMA: u32 = 20 | INTONATION_COMMA | TYPE_CLAUSE;
const CLAUSE_QUESTION: u32 = 40 | INTONATION_QUESTION | TYPE_SENTENCE;
const CLAUSE_EXCLAMATION: u32 = 45 | INTONATION_EXCLAMATION | TYPE_SENTENCE;
const CLAUSE_COLON: u32 = 30 | TYPE_CLAUSE;
const CLAUSE_SEMICOLON: u32 = 30 | INTONATION_COMMA | TYPE_CLAUSE;
const CLAUSE_EOF: u32 = 40 | TYPE_SENTENCE | TYPE_EOF;
const CLAUSE_PARAGRAPH: u32 = 70 | TYPE_SENTENCE;
const CLAUSE_NONE: u32 = 0x4000;
const CLAUSE_ELLIPSIS: u32 = CLAUSE_SEMICOLON | 0x200000 | 0x8000;

type InitializeFn = unsafe extern "C" fn(c_int, c_int, *const c_char, c_int) -> c_int;
type SetVoiceFn = unsafe extern "C" fn(*const c_char) -> c_int;
type TextToPhonemesFn = unsafe extern "C" fn(*mut *const c_void, c_int, c_int) -> *const c_char;
type WithTerminatorFn =
    unsafe extern "C" fn(*mut *const c_void, c_int, c_int, *mut c_int) -> *const c_char;

struct Espeak {
    // Kept loaded for the function pointers below.
    _library: libloading::Library,
    set_voice: SetVoiceFn,
    text_to_phonemes: TextToPhonemesFn,
    with_terminator: Option<WithTerminatorFn>,
    voice: Option<String>,
}

static ESPEAK: Mutex<Option<Espeak>> = Mutex::new(None);

fn unavailable(reason: String) -> Error {
    Error::Phonemizer(format!(
        "{reason}; install espeak-ng's library (Debian: apt-get install libespeak-ng1), \
         or run scripts/setup"
    ))
}

impl Espeak {
    fn load() -> Result<Self> {
        let mut last = String::new();
        let library = LIBRARY_NAMES
            .iter()
            .find_map(|name| {
                // SAFETY: loading espeak-ng runs no initialisers with
                // preconditions of ours.
                unsafe { libloading::Library::new(name) }
                    .map_err(|e| last = e.to_string())
                    .ok()
            })
            .ok_or_else(|| unavailable(format!("cannot load libespeak-ng ({last})")))?;
        // SAFETY: the signatures are espeak-ng's (speak_lib.h), stable
        // since 1.49; the pointers live as long as `library`, which Espeak
        // keeps.
        unsafe {
            let symbol = |name: &[u8]| -> Result<*const c_void> {
                library
                    .get::<*const c_void>(name)
                    .map(|s| *s)
                    .map_err(|e| unavailable(format!("libespeak-ng lacks a function: {e}")))
            };
            let initialize: InitializeFn = std::mem::transmute(symbol(b"espeak_Initialize\0")?);
            let set_voice: SetVoiceFn = std::mem::transmute(symbol(b"espeak_SetVoiceByName\0")?);
            let text_to_phonemes: TextToPhonemesFn =
                std::mem::transmute(symbol(b"espeak_TextToPhonemes\0")?);
            let with_terminator = library
                .get::<WithTerminatorFn>(b"espeak_TextToPhonemesWithTerminator\0")
                .ok()
                .map(|s| *s);
            let rate = initialize(
                AUDIO_OUTPUT_SYNCHRONOUS,
                0,
                std::ptr::null(),
                INITIALIZE_DONT_EXIT,
            );
            if rate < 0 {
                return Err(unavailable(
                    "espeak-ng failed to start (is espeak-ng-data installed?)".to_owned(),
                ));
            }
            Ok(Espeak {
                _library: library,
                set_voice,
                text_to_phonemes,
                with_terminator,
                voice: None,
            })
        }
    }

    fn use_voice(&mut self, voice: &str) -> Result<()> {
        if self.voice.as_deref() == Some(voice) {
            return Ok(());
        }
        let name = CString::new(voice)
            .map_err(|_| Error::Phonemizer(format!("voice name {voice:?} has a NUL byte")))?;
        // SAFETY: a valid C string; espeak copies what it needs.
        let rc = unsafe { (self.set_voice)(name.as_ptr()) };
        if rc != 0 {
            return Err(Error::Phonemizer(format!(
                "espeak-ng has no voice {voice:?} (error {rc})"
            )));
        }
        self.voice = Some(voice.to_owned());
        Ok(())
    }

    /// The sentences of `text`, each as Piper's phoneme string (before NFD).
    fn sentences(&mut self, text: &str) -> Vec<String> {
        // espeak reads to a NUL: interior ones would cut the text short.
        let clean: String = text.chars().filter(|&c| c != '\0').collect();
        let Ok(c_text) = CString::new(clean) else {
            return Vec::new();
        };
        let bytes = c_text.as_bytes();
        let base = c_text.as_ptr();
        let mut ptr: *const c_void = base.cast();
        let mut sentences = Vec::new();
        let mut current = String::new();
        let mut pending = false;
        // espeak keeps one character of look-ahead in global state: a text
        // is always read to its end (ptr becomes null).
        while !ptr.is_null() {
            let start = (ptr as usize) - (base as usize);
            let mut real: c_int = 0;
            // SAFETY: ptr points into c_text, NUL-terminated and alive for
            // the whole loop; espeak advances it or sets it to null.
            let phonemes = unsafe {
                match self.with_terminator {
                    Some(f) => f(&mut ptr, CHARS_AUTO, PHONEMES_IPA, &mut real),
                    None => (self.text_to_phonemes)(&mut ptr, CHARS_AUTO, PHONEMES_IPA),
                }
            };
            // espeak advances the pointer through the text or clears it; a
            // pointer that did not move (or left the text) would loop
            // forever under the global lock, so the text ends there.
            let next = (!ptr.is_null())
                .then(|| (ptr as usize).wrapping_sub(base as usize))
                .filter(|&n| n > start && n <= bytes.len());
            if next.is_none() {
                ptr = std::ptr::null();
            }
            let terminator = match self.with_terminator {
                Some(_) => real as u32,
                None => {
                    infer_terminator(&bytes[start..next.unwrap_or(bytes.len())], next.is_some())
                }
            };
            if !phonemes.is_null() {
                // SAFETY: espeak returns a NUL-terminated string in a static
                // buffer, valid until the next call; copied now.
                let s = unsafe { CStr::from_ptr(phonemes) }.to_string_lossy();
                push_without_language_flags(&mut current, &s);
            }
            pending = true;
            current.push_str(match terminator & 0x000F_FFFF {
                CLAUSE_PERIOD => ".",
                CLAUSE_QUESTION => "?",
                CLAUSE_EXCLAMATION => "!",
                CLAUSE_COMMA => ", ",
                CLAUSE_COLON => ": ",
                CLAUSE_SEMICOLON => "; ",
                _ => "",
            });
            if terminator & TYPE_SENTENCE == TYPE_SENTENCE {
                sentences.push(std::mem::take(&mut current));
                pending = false;
            }
        }
        if pending {
            sentences.push(current);
        }
        sentences
    }
}

/// Appends `phonemes` leaving out language-switch flags like `(en)`.
fn push_without_language_flags(out: &mut String, phonemes: &str) {
    let mut in_flag = false;
    for c in phonemes.chars() {
        match (in_flag, c) {
            (true, ')') => in_flag = false,
            (true, _) => {}
            (false, '(') => in_flag = true,
            (false, c) => out.push(c),
        }
    }
}

/// The terminator espeak's `ReadClause` returned for a clause that consumed
/// `span` (its text, the punctuation and spaces after it, and, unless this
/// was the end of the text, one character of look-ahead).
fn infer_terminator(span: &[u8], more: bool) -> u32 {
    let text = String::from_utf8_lossy(span);
    let mut chars: Vec<char> = text.chars().collect();
    if more {
        chars.pop();
    }
    let mut newlines = 0;
    while let Some(&c) = chars.last() {
        if !c.is_whitespace() {
            break;
        }
        if c == '\n' {
            newlines += 1;
        }
        chars.pop();
    }
    let end = chars.len();
    let mut run = end;
    while run > 0 && clause_type(chars[run - 1]) != 0 {
        run -= 1;
    }
    let mut t = if run == end {
        if more {
            CLAUSE_NONE
        } else {
            CLAUSE_EOF
        }
    } else {
        let first = chars[run];
        let dots = chars[run..end].iter().take_while(|&&c| c == '.').count();
        if matches!(first, '?' | '!' | '\u{FF1F}' | '\u{FF01}') {
            clause_type(first)
        } else if first == '\u{2026}' || dots >= 3 {
            CLAUSE_ELLIPSIS
        } else {
            clause_type(chars[end - 1])
        }
    };
    if newlines >= 2 {
        t = if t == CLAUSE_QUESTION || t == CLAUSE_EXCLAMATION {
            t + 35
        } else {
            CLAUSE_PARAGRAPH
        };
    }
    t
}

/// espeak's clause type of a punctuation character (the Latin-script and
/// CJK-fullwidth subset of its `ucd` properties), 0 for anything else.
fn clause_type(c: char) -> u32 {
    const OPTIONAL_SPACE_AFTER: u32 = 0x8000;
    match c {
        '.' => CLAUSE_PERIOD,
        '?' => CLAUSE_QUESTION,
        '!' => CLAUSE_EXCLAMATION,
        ',' => CLAUSE_COMMA,
        ':' => CLAUSE_COLON,
        ';' => CLAUSE_SEMICOLON,
        '\u{2013}' | '\u{2014}' | '\u{2E3A}' | '\u{2E3B}' => CLAUSE_SEMICOLON,
        '\u{2026}' => CLAUSE_ELLIPSIS,
        '\u{3002}' => CLAUSE_PERIOD | OPTIONAL_SPACE_AFTER,
        '\u{FF1F}' => CLAUSE_QUESTION | OPTIONAL_SPACE_AFTER,
        '\u{FF01}' => CLAUSE_EXCLAMATION | OPTIONAL_SPACE_AFTER,
        '\u{FF0C}' | '\u{3001}' => CLAUSE_COMMA | OPTIONAL_SPACE_AFTER,
        '\u{FF1A}' => CLAUSE_COLON | OPTIONAL_SPACE_AFTER,
        '\u{FF1B}' => CLAUSE_SEMICOLON | OPTIONAL_SPACE_AFTER,
        _ => 0,
    }
}

/// One sentence: its phonemes (one code point each, NFD) and ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhonemizedSentence {
    /// The phoneme string, NFD-normalised.
    pub phonemes: String,
    /// `^ _ (p _)* $` through the voice's map.
    pub ids: Vec<i64>,
    /// Phonemes the map lacks (left out of `ids`).
    pub missing: Vec<char>,
}

/// Piper's phonemizer for one voice: an espeak-ng voice and the voice's
/// `phoneme_id_map`.
#[derive(Debug, Clone)]
pub struct Phonemizer {
    espeak_voice: String,
    id_map: HashMap<char, Vec<i64>>,
}

impl Phonemizer {
    /// A phonemizer speaking `espeak_voice` (e.g. `en-us`) with `id_map`
    /// (Piper's `phoneme_id_map`: one code point to its ids). The map must
    /// hold Piper's specials `^` (BOS), `$` (EOS) and `_` (pad).
    pub fn new(espeak_voice: &str, id_map: HashMap<char, Vec<i64>>) -> Result<Self> {
        for special in ['^', '$', '_'] {
            if !id_map.contains_key(&special) {
                return Err(Error::Phonemizer(format!(
                    "phoneme_id_map lacks {special:?} (BOS ^, EOS $ and pad _ are required)"
                )));
            }
        }
        Ok(Phonemizer {
            espeak_voice: espeak_voice.to_owned(),
            id_map,
        })
    }

    /// The espeak-ng voice.
    pub fn espeak_voice(&self) -> &str {
        &self.espeak_voice
    }

    /// `text` as sentences of phoneme ids, as Piper speaks it.
    pub fn phonemize(&self, text: &str) -> Result<Vec<PhonemizedSentence>> {
        let raw = {
            let mut guard = ESPEAK.lock().unwrap_or_else(|e| e.into_inner());
            if guard.is_none() {
                *guard = Some(Espeak::load()?);
            }
            let espeak = guard.as_mut().ok_or_else(|| unavailable(String::new()))?;
            espeak.use_voice(&self.espeak_voice)?;
            espeak.sentences(text)
        };
        Ok(raw
            .into_iter()
            .map(|s| {
                let phonemes: String = s.nfd().collect();
                let (ids, missing) = self.ids(&phonemes);
                PhonemizedSentence {
                    phonemes,
                    ids,
                    missing,
                }
            })
            .collect())
    }

    /// Piper's `phonemes_to_ids`: BOS, pad, then each phoneme and a pad,
    /// then EOS; unknown phonemes are skipped (and returned).
    pub fn ids(&self, phonemes: &str) -> (Vec<i64>, Vec<char>) {
        let map = &self.id_map;
        let pad = &map[&'_'];
        let mut ids = Vec::with_capacity(phonemes.len() * 2 + 3);
        ids.extend_from_slice(&map[&'^']);
        ids.extend_from_slice(pad);
        let mut missing = Vec::new();
        for c in phonemes.chars() {
            match map.get(&c) {
                Some(id) => {
                    ids.extend_from_slice(id);
                    ids.extend_from_slice(pad);
                }
                None => missing.push(c),
            }
        }
        ids.extend_from_slice(&map[&'$']);
        (ids, missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminators_are_read_from_the_consumed_text() {
        // (span consumed, more text follows, expected)
        let cases: &[(&str, bool, u32)] = &[
            ("Hello, w", true, CLAUSE_COMMA),
            ("world! H", true, CLAUSE_EXCLAMATION),
            ("today?", false, CLAUSE_QUESTION),
            ("Wait... w", true, CLAUSE_ELLIPSIS),
            ("what?! N", true, CLAUSE_QUESTION),
            ("it's 10:45 already.", false, CLAUSE_PERIOD),
            ("no punctuation", false, CLAUSE_EOF),
            ("a long clause that was split b", true, CLAUSE_NONE),
            ("end.\n\nN", true, CLAUSE_PARAGRAPH),
            ("said \"yes\" \u{2014} t", true, CLAUSE_SEMICOLON),
        ];
        for &(span, more, want) in cases {
            assert_eq!(infer_terminator(span.as_bytes(), more), want, "{span:?}");
        }
    }

    #[test]
    fn ids_interleave_pad_and_skip_unknown_phonemes() -> Result<()> {
        let map: HashMap<char, Vec<i64>> = [('^', 1), ('$', 2), ('_', 0), ('a', 14), ('b', 15)]
            .into_iter()
            .map(|(c, i)| (c, vec![i]))
            .collect();
        let p = Phonemizer::new("en-us", map)?;
        assert_eq!(p.ids("abz"), (vec![1, 0, 14, 0, 15, 0, 2], vec!['z']));
        assert!(Phonemizer::new("en-us", HashMap::new()).is_err());
        Ok(())
    }

    #[test]
    fn language_flags_are_removed() {
        let mut s = String::new();
        push_without_language_flags(&mut s, "(en)hɛlˈoʊ(fr)");
        assert_eq!(s, "hɛlˈoʊ");
    }
}
