//! `switchyard bench-tokens`: how fast the gateway counts tokens, against tiktoken-rs on
//! the same text (with the `tokenizer-compare` feature), and how long the worst case, one
//! character repeated for 1 MiB, takes. Figures in docs/BENCHMARKS.md, "Tokenizer".

use std::fmt::Write as _;
use std::hint::black_box;
use std::io::Write;
use std::time::{Duration, Instant};

use super::{TokenizerKind, count};

/// Samples of what prompts hold, mixed into the benchmark text and used as the agreement
/// corpus in the tests: prose, code, JSON, CJK, emoji, other scripts, whitespace runs.
pub const SAMPLES: &[&str] = &[
    "The quick brown fox jumps over the lazy dog. It's a well-known pangram; they're \
     used to test fonts, keyboards and (as here) tokenizers. Don't you think we'll need \
     more? I'd say so: 12 apples, 3.14159 pies, 1,000,000 reasons and 2024-05-13T10:00:00Z.",
    "fn main() {\n    let mut total: u64 = 0;\n    for i in 0..10 {\n        total += i * i;\n    }\n    \
     println!(\"{total}\");\n}\n",
    "def fib(n):\n\tif n < 2:\n\t\treturn n\n\treturn fib(n - 1) + fib(n - 2)\n\n\nprint([fib(i) for i in range(20)])\r\n",
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"temperature":0.7,"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}]}"#,
    "机器学习是人工智能的一个分支。東京は日本の首都です。한국어 문장도 포함합니다. 我们今天去公园散步吧！",
    "Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇯🇵🇫🇷 ❤️‍🔥 — and symbols: © ® ™ ∑ ∫ √ ≠ ≤ ≥ ← → ∞ ½",
    "Русский текст, العربية نص, हिन्दी पाठ, ελληνικά, עברית, ไทย, Tiếng Việt có dấu.",
    "    indented    with    runs      of spaces\t\t\ttabs\n\n\n\nnewlines \r\n\r\n trailing   \n",
    "\u{00a0}non-breaking\u{00a0}\u{00a0}spaces\u{3000}ideographic\u{3000}space\u{2003}em\u{2009}thin ",
    "https://example.com/path/to/resource?query=value&other=123#fragment user@example.org",
    "SGVsbG8gV29ybGQhIFRoaXMgaXMgYmFzZTY0IGVuY29kZWQgdGV4dCB0aGF0IGdvZXMgb24gZm9yIGEgd2hpbGUu",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa \
     ............................................................ !!!??? ___ --- === +++",
    "CamelCaseIdentifiers snake_case_names SCREAMING_CASE kebab-case-words getHTTPResponseCode \
     XMLHttpRequest I'M SHOUTING THEY'LL WE'VE Can't won't O'Neil's",
    "Numbers: 0 1 12 123 1234 12345 123456 1234567 -42 +7 3.0e-10 0x1F 0b1010 1_000_000 ٣٤٥ ⅷ",
    "<|endoftext|> <|im_start|>user\nspecial token text is ordinary text here<|im_end|>",
];

/// Mixed benchmark text of at least `bytes`: the samples in turn, each with a running
/// number so no two stretches are the same.
pub fn mixed_text(bytes: usize) -> String {
    let mut text = String::with_capacity(bytes + 1024);
    let mut n: u64 = 0;
    while text.len() < bytes {
        for sample in SAMPLES {
            let _ = writeln!(text, "{sample} #{n}");
            n += 1;
        }
    }
    text
}

/// One tokenizer under test: a name and how it counts a text.
struct Contender {
    name: &'static str,
    encoding: &'static str,
    count: Box<dyn Fn(&str) -> usize>,
}

fn contenders() -> Vec<Contender> {
    #[allow(unused_mut)]
    let mut all = vec![
        Contender {
            name: "bpe-openai",
            encoding: "o200k_base",
            count: Box::new(|text| bpe_openai::o200k_base().count(text)),
        },
        Contender {
            name: "bpe-openai",
            encoding: "cl100k_base",
            count: Box::new(|text| bpe_openai::cl100k_base().count(text)),
        },
        Contender {
            name: "tokens::count",
            encoding: "o200k_base",
            count: Box::new(|text| count(TokenizerKind::O200kBase, text) as usize),
        },
        Contender {
            name: "tokens::count",
            encoding: "approx",
            count: Box::new(|text| count(TokenizerKind::Approx, text) as usize),
        },
    ];
    #[cfg(feature = "tokenizer-compare")]
    {
        all.push(Contender {
            name: "tiktoken-rs",
            encoding: "o200k_base",
            count: Box::new(|text| tiktoken_rs::o200k_base_singleton().count_ordinary(text)),
        });
        all.push(Contender {
            name: "tiktoken-rs",
            encoding: "cl100k_base",
            count: Box::new(|text| tiktoken_rs::cl100k_base_singleton().count_ordinary(text)),
        });
        all.push(Contender {
            name: "tiktoken-rs/64K",
            encoding: "o200k_base",
            count: Box::new(|text| {
                let bpe = tiktoken_rs::o200k_base_singleton();
                super::pieces(text).map(|p| bpe.count_ordinary(p)).sum()
            }),
        });
    }
    all
}

/// Runs the benchmark on `mib` MiB of mixed text, writing the report as it goes.
///
/// # Errors
/// Only from writing to `out`.
pub fn run(mib: usize, out: &mut dyn Write) -> std::io::Result<()> {
    let text = mixed_text(mib.max(1) << 20);
    writeln!(
        out,
        "mixed text: {} bytes ({} samples of prose, code, JSON, CJK, emoji, other scripts, \
         whitespace runs, repeated)",
        text.len(),
        SAMPLES.len()
    )?;
    if cfg!(not(feature = "tokenizer-compare")) {
        writeln!(
            out,
            "(tiktoken-rs not built in: rebuild with --features tokenizer-compare to compare)"
        )?;
    }
    writeln!(
        out,
        "\n{:<16} {:<12} {:>10} {:>12} {:>11}",
        "crate", "encoding", "MB/s", "tokens", "first use"
    )?;
    let all = contenders();
    for c in all.iter().filter(|c| !c.name.ends_with("/64K")) {
        let started = Instant::now();
        black_box((c.count)(black_box("warm up")));
        let first_use = started.elapsed();
        let row = match best_of(3, || (c.count)(&text)) {
            Ok((best, tokens)) => format!(
                "{:>10.1} {:>12} {:>11}",
                text.len() as f64 / best.as_secs_f64() / 1e6,
                tokens,
                millis(first_use)
            ),
            Err(panic) => format!("panicked: {panic}"),
        };
        writeln!(out, "{:<16} {:<12} {row}", c.name, c.encoding)?;
    }

    writeln!(
        out,
        "\nworst case: one character repeated for 1 MiB, one call (/64K: cut in 64 KiB \
         pieces)\n\n{:<16} {:<12} {:<10} {:>12} {:>10}",
        "crate", "encoding", "input", "time", "tokens"
    )?;
    for (label, unit) in [("\"a\" x 1Mi", "a"), ("\" \" x 1Mi", " ")] {
        let input = unit.repeat(1 << 20);
        for c in all.iter().filter(|c| c.encoding == "o200k_base") {
            let row = match best_of(1, || (c.count)(&input)) {
                Ok((best, tokens)) => format!("{:>12} {:>10}", millis(best), tokens),
                Err(panic) => format!("panicked: {panic}"),
            };
            writeln!(out, "{:<16} {:<12} {label:<10} {row}", c.name, c.encoding)?;
        }
    }
    Ok(())
}

/// The fastest of `runs` runs of `work`, and what it returned; or what it panicked with
/// (tiktoken-rs does on some inputs), with the panic kept off the terminal.
fn best_of(runs: usize, work: impl Fn() -> usize) -> Result<(Duration, usize), String> {
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut best = Duration::MAX;
        let mut result = 0;
        for _ in 0..runs.max(1) {
            let started = Instant::now();
            result = black_box(work());
            best = best.min(started.elapsed());
        }
        (best, result)
    }));
    std::panic::set_hook(quiet);
    outcome.map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "(no message)".into())
    })
}

fn millis(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}
