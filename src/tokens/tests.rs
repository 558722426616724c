//! Counts checked against tiktoken-rs, the reference implementation of OpenAI's
//! tokenizers, and the chunking's cut points.

use std::time::{Duration, Instant};

use super::bench::{SAMPLES, mixed_text};
use super::*;

fn reference(kind: TokenizerKind, text: &str) -> u64 {
    let bpe = match kind {
        TokenizerKind::O200kBase => tiktoken_rs::o200k_base_singleton(),
        TokenizerKind::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        TokenizerKind::Approx => unreachable!("no reference for the estimate"),
    };
    bpe.count_ordinary(text) as u64
}

const EXACT: [TokenizerKind; 2] = [TokenizerKind::O200kBase, TokenizerKind::Cl100kBase];

#[test]
fn known_counts() {
    for kind in EXACT {
        assert_eq!(count(kind, "hello world"), 2, "{kind:?}");
        assert_eq!(reference(kind, "hello world"), 2, "{kind:?}");
        assert_eq!(count(kind, ""), 0);
    }
    for (text, o200k, cl100k) in [
        ("user", 1, 1),
        ("tiktoken is great!", 6, 6),
        ("你好，世界", 3, 6),
    ] {
        assert_eq!(count(TokenizerKind::O200kBase, text), o200k, "{text}");
        assert_eq!(reference(TokenizerKind::O200kBase, text), o200k, "{text}");
        assert_eq!(count(TokenizerKind::Cl100kBase, text), cl100k, "{text}");
        assert_eq!(reference(TokenizerKind::Cl100kBase, text), cl100k, "{text}");
    }
}

/// Every sample, every pair of samples run together, and the samples cut at every
/// character of a sliding window: the same count as tiktoken-rs.
#[test]
fn counts_agree_with_tiktoken_on_the_corpus() {
    for kind in EXACT {
        for sample in SAMPLES {
            assert_eq!(
                count(kind, sample),
                reference(kind, sample),
                "{kind:?} {sample:?}"
            );
        }
        for a in SAMPLES {
            for b in SAMPLES {
                let joined = format!("{a}{b}");
                assert_eq!(
                    count(kind, &joined),
                    reference(kind, &joined),
                    "{kind:?} {joined:?}"
                );
            }
        }
        let all = SAMPLES.concat();
        let boundaries: Vec<usize> = all.char_indices().map(|(i, _)| i).step_by(7).collect();
        for window in boundaries.windows(9) {
            let part = &all[window[0]..window[8]];
            assert_eq!(
                count(kind, part),
                reference(kind, part),
                "{kind:?} {part:?}"
            );
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
    /// Arbitrary Unicode, whitespace-heavy, agrees too.
    #[test]
    fn counts_agree_with_tiktoken_on_any_text(
        text in "(\\PC|[ \\t\\n\\r\u{a0}\u{3000}]){0,64}",
    ) {
        for kind in EXACT {
            proptest::prop_assert_eq!(count(kind, &text), reference(kind, &text));
        }
    }
}

/// Text past the piece size is cut at lone spaces, where the count stays exact.
#[test]
fn long_text_is_cut_where_the_count_stays_exact() {
    let text = mixed_text(5 * MAX_PIECE_BYTES / 2);
    let pieces: Vec<&str> = pieces(&text).collect();
    assert!(pieces.len() >= 3, "{}", pieces.len());
    assert_eq!(pieces.concat(), text);
    for piece in &pieces[..pieces.len() - 1] {
        assert!(piece.len() <= MAX_PIECE_BYTES && piece.len() > MAX_PIECE_BYTES / 2);
    }
    for kind in EXACT {
        assert_eq!(count(kind, &text), reference(kind, &text), "{kind:?}");
    }
}

/// A 1 MiB run of one character has no lone space: it is cut at character boundaries,
/// each cut adding at most a token or two, and counted in linear time.
#[test]
fn one_character_repeated_is_linear_and_nearly_exact() {
    for unit in ["a", "é", "😀", " ", "\n"] {
        let text = unit.repeat((1 << 20) / unit.len());
        let pieces: Vec<&str> = pieces(&text).collect();
        assert!(pieces.iter().all(|p| p.len() <= MAX_PIECE_BYTES));
        assert_eq!(pieces.concat(), text);
        let whole = bpe_openai::o200k_base().count(&text) as u64;
        let cut = count(TokenizerKind::O200kBase, &text);
        let cuts = pieces.len() as u64 - 1;
        assert!(
            whole.abs_diff(cut) <= 2 * cuts,
            "{unit:?}: {whole} vs {cut}"
        );
    }
    // Linear: 1 MiB takes at most a few times 64 KiB × 16 (generous for a debug build on
    // a loaded machine; a quadratic count would take minutes).
    let small = "a".repeat(MAX_PIECE_BYTES);
    let large = "a".repeat(16 * MAX_PIECE_BYTES);
    let time = |text: &str| {
        let started = Instant::now();
        count(TokenizerKind::O200kBase, text);
        started.elapsed()
    };
    let per_piece = time(&small).max(Duration::from_micros(100));
    let whole = time(&large);
    assert!(
        whole < per_piece * 16 * 8,
        "{whole:?} vs {per_piece:?} per piece"
    );
}

#[test]
fn approx_is_cheap_and_in_the_right_range() {
    assert_eq!(approx(""), 0);
    assert_eq!(approx("abc"), 1);
    assert_eq!(approx("abcd"), 2);
    assert_eq!(approx("日本"), 2);
    assert_eq!(approx("a😀"), 2);
    assert_eq!(count(TokenizerKind::Approx, "hello world"), 4);
    // Over the corpus it is close to OpenAI's tokenizers (measured: within 1 % of o200k,
    // 10 % under cl100k).
    let text = mixed_text(64 * 1024);
    let estimate = approx(&text) as f64;
    let o200k = estimate / count(TokenizerKind::O200kBase, &text) as f64;
    let cl100k = estimate / count(TokenizerKind::Cl100kBase, &text) as f64;
    assert!((0.95..1.05).contains(&o200k), "{o200k}");
    assert!((0.85..1.0).contains(&cl100k), "{cl100k}");
}

#[test]
fn tokenizer_names_read_from_config() {
    #[derive(serde::Deserialize)]
    struct T {
        t: TokenizerKind,
    }
    for kind in [
        TokenizerKind::O200kBase,
        TokenizerKind::Cl100kBase,
        TokenizerKind::Approx,
    ] {
        let parsed: T = toml::from_str(&format!("t = \"{}\"", kind.as_str())).unwrap();
        assert_eq!(parsed.t, kind);
    }
    assert!(toml::from_str::<T>("t = \"p50k_base\"").is_err());
}
