//! The search index over one subject's memories, built in memory from the store's rows and
//! kept per subject in a byte-bounded cache.
//!
//! Ranking, in three parts:
//! - **Okapi BM25** (k1 = 1.2, b = 0.75) over lower-cased alphanumeric tokens, a small
//!   English stop list removed, each token reduced to its Snowball (Porter 2) stem, so
//!   "moved", "moving" and "moves" meet.
//! - **Neighbours**: memories are kept in the order they were written, and each one's score
//!   is raised by half the better of its two neighbours' scores. Memories written together
//!   (the turns of one dialogue, the facts of one extraction) are each other's context: a
//!   question that names the topic of one turn often finds its answer in the next.
//! - **Recency**: a bonus of up to 10% that halves every `recency_half_life` since the
//!   memory last changed, so of two equally relevant memories the fresher comes first.
//! - **Similarity**, when memories have vectors (`[memory] embeddings`) and the query's
//!   vector is given: the memories nearest to it by cosine form a second ranking, and the
//!   two are fused by reciprocal rank fusion (k = 60): each memory scores the sum of
//!   `1 / (60 + rank)` over the rankings it is in. Ranks rather than scores are fused
//!   because BM25 and cosine scales have nothing in common. The scan is exhaustive: a
//!   subject holds thousands of memories, not millions, and an `i8` dot product over all
//!   of them costs less than an approximate index would to keep current.
//!
//! The index is hand-written rather than the store's full-text search: the ranking must be
//! the same on SQLite and PostgreSQL (whose `ts_rank` is not BM25), the neighbour step
//! needs every memory's score, and a subject's index answers in microseconds without a
//! database round trip on the turn's path.

use std::collections::HashMap;
use std::sync::LazyLock;

use rust_stemmers::{Algorithm, Stemmer};

use super::embed::Vector;
use crate::store::memories::MemoryRow;

const K1: f32 = 1.2;
const B: f32 = 0.75;
/// The share of its better neighbour's score a memory gains.
const NEIGHBOUR_WEIGHT: f32 = 0.5;
/// The most a fresh memory's score is raised by recency.
const RECENCY_WEIGHT: f64 = 0.1;
/// Reciprocal rank fusion's constant (the value of its paper, and of most systems since).
const RRF_K: f32 = 60.0;
/// Entries of each ranking that take part in the fusion, at least.
const FUSED_DEPTH: usize = 50;

static STEMMER: LazyLock<Stemmer> = LazyLock::new(|| Stemmer::create(Algorithm::English));

/// Words too common to tell memories apart.
const STOP_WORDS: &[&str] = &[
    "a", "about", "again", "all", "an", "and", "any", "are", "as", "at", "be", "been", "being",
    "both", "but", "by", "can", "did", "do", "does", "each", "few", "for", "from", "had", "has",
    "have", "he", "her", "here", "him", "his", "how", "i", "if", "in", "into", "is", "it", "its",
    "just", "me", "more", "most", "my", "no", "not", "now", "of", "on", "once", "only", "or",
    "other", "our", "out", "over", "own", "s", "same", "she", "should", "so", "some", "such", "t",
    "than", "that", "the", "their", "them", "then", "there", "these", "they", "this", "those",
    "to", "too", "up", "very", "was", "we", "were", "what", "when", "where", "which", "who",
    "whom", "why", "will", "with", "yes", "you", "your",
];

/// The stemmed, stop-word-free terms of a text, in order.
pub fn terms(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let lower = word.to_lowercase();
        if STOP_WORDS.binary_search(&lower.as_str()).is_ok() {
            continue;
        }
        out.push(STEMMER.stem(&lower).into_owned());
    }
    out
}

/// One memory as the index holds it.
#[derive(Debug, Clone)]
pub struct Doc {
    pub id: String,
    pub memory: String,
    pub metadata: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// Terms in the memory.
    len: u32,
    vector: Option<Vector>,
}

/// A subject's memories, searchable.
#[derive(Debug, Default)]
pub struct SubjectIndex {
    /// The subject's version when the rows were read.
    pub version: i64,
    docs: Vec<Doc>,
    /// Term → (memory's position, occurrences), positions ascending.
    postings: HashMap<String, Vec<(u32, u32)>>,
    avg_len: f32,
    bytes: usize,
    /// Memories with a vector × their dimensions: what a similarity scan costs.
    vector_work: usize,
}

/// One search result: a position in the index and its score (higher is better; scores
/// compare within one search).
#[derive(Debug, Clone, Copy)]
pub struct Hit {
    pub position: usize,
    pub score: f32,
}

impl SubjectIndex {
    /// Builds the index of rows given in the order they were written.
    pub fn build(version: i64, rows: Vec<MemoryRow>) -> SubjectIndex {
        let mut postings: HashMap<String, Vec<(u32, u32)>> = HashMap::new();
        let mut docs = Vec::with_capacity(rows.len());
        let mut total = 0u64;
        let mut bytes = 0usize;
        let mut vector_work = 0usize;
        for (position, row) in rows.into_iter().enumerate() {
            let position = u32::try_from(position).unwrap_or(u32::MAX);
            let words = terms(&row.memory);
            let mut counts: HashMap<String, u32> = HashMap::new();
            for word in &words {
                *counts.entry(word.clone()).or_default() += 1;
            }
            for (word, n) in counts {
                bytes += word.len() + 8;
                postings.entry(word).or_default().push((position, n));
            }
            total += words.len() as u64;
            bytes += row.id.len() + row.memory.len() + row.metadata.len() + 64;
            let vector = row.embedding.as_deref().and_then(Vector::decode);
            if let Some(v) = &vector {
                bytes += v.len() + 24;
                vector_work += v.len();
            }
            docs.push(Doc {
                id: row.id,
                memory: row.memory,
                metadata: row.metadata,
                created_at: row.created_at,
                updated_at: row.updated_at,
                len: u32::try_from(words.len()).unwrap_or(u32::MAX),
                vector,
            });
        }
        let avg_len = if docs.is_empty() {
            1.0
        } else {
            (total as f32 / docs.len() as f32).max(1.0)
        };
        SubjectIndex {
            version,
            docs,
            postings,
            avg_len,
            bytes,
            vector_work,
        }
    }

    /// Memories with a vector × their dimensions (0: none has one).
    pub fn vector_work(&self) -> usize {
        self.vector_work
    }

    pub fn len(&self) -> usize {
        self.docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Roughly what the index holds, for the cache's bound.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn doc(&self, position: usize) -> &Doc {
        &self.docs[position]
    }

    /// The `limit` memories written last, newest first (what fills a turn's memory slot
    /// after the matches).
    pub fn newest(&self, limit: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.docs.len()).rev().take(limit)
    }

    /// The best `limit` memories for `query`, best first. By full text alone (without
    /// `vector`, or when no memory has one of its dimensions), only memories that share a
    /// term with the query or neighbour one that does; with it, the full-text and the
    /// similarity rankings fused. `now` and `half_life` are in seconds.
    pub fn search(
        &self,
        query: &str,
        vector: Option<&Vector>,
        limit: usize,
        now: i64,
        half_life: f64,
    ) -> Vec<Hit> {
        let similar = vector.map_or_else(Vec::new, |v| self.similar(v, limit.max(FUSED_DEPTH)));
        if similar.is_empty() {
            return self.full_text(query, limit, now, half_life);
        }
        let text = self.full_text(query, limit.max(FUSED_DEPTH), now, half_life);
        let mut fused: HashMap<usize, f32> = HashMap::with_capacity(text.len() + similar.len());
        for ranking in [&text, &similar] {
            for (rank, hit) in ranking.iter().enumerate() {
                *fused.entry(hit.position).or_default() += 1.0 / (RRF_K + rank as f32 + 1.0);
            }
        }
        let mut hits: Vec<Hit> = fused
            .into_iter()
            .map(|(position, score)| Hit { position, score })
            .collect();
        top(&mut hits, limit);
        hits
    }

    /// The `depth` memories nearest to `vector` by cosine, nearest first.
    fn similar(&self, vector: &Vector, depth: usize) -> Vec<Hit> {
        let mut hits: Vec<Hit> = self
            .docs
            .iter()
            .enumerate()
            .filter_map(|(position, doc)| {
                let score = doc.vector.as_ref()?.cosine(vector)?;
                Some(Hit { position, score })
            })
            .collect();
        top(&mut hits, depth);
        hits
    }

    /// The full-text ranking (BM25, neighbours, recency), best `limit` first.
    fn full_text(&self, query: &str, limit: usize, now: i64, half_life: f64) -> Vec<Hit> {
        let n = self.docs.len();
        if n == 0 || limit == 0 {
            return Vec::new();
        }
        let mut query_terms = terms(query);
        query_terms.sort_unstable();
        query_terms.dedup();
        let mut scores = vec![0f32; n];
        let mut touched = Vec::new();
        for term in &query_terms {
            let Some(list) = self.postings.get(term) else {
                continue;
            };
            let df = list.len() as f32;
            let idf = (1.0 + (n as f32 - df + 0.5) / (df + 0.5)).ln();
            for &(position, tf) in list {
                let doc = &self.docs[position as usize];
                let tf = tf as f32;
                let norm = 1.0 - B + B * doc.len as f32 / self.avg_len;
                let slot = &mut scores[position as usize];
                if *slot == 0.0 {
                    touched.push(position as usize);
                }
                *slot += idf * tf * (K1 + 1.0) / (tf + K1 * norm);
            }
        }
        if touched.is_empty() {
            return Vec::new();
        }
        // Neighbours: each matched memory lends weight to the two beside it, so the
        // candidates are the matches and their neighbours.
        let mut candidates: Vec<usize> = Vec::with_capacity(touched.len() * 3);
        for &p in &touched {
            candidates.push(p);
            if p > 0 {
                candidates.push(p - 1);
            }
            if p + 1 < n {
                candidates.push(p + 1);
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        let mut hits: Vec<Hit> = candidates
            .into_iter()
            .map(|p| {
                let before = if p > 0 { scores[p - 1] } else { 0.0 };
                let after = if p + 1 < n { scores[p + 1] } else { 0.0 };
                let text = scores[p] + NEIGHBOUR_WEIGHT * before.max(after);
                let age = (now - self.docs[p].updated_at).max(0) as f64;
                let fresh = RECENCY_WEIGHT * (-age / half_life * std::f64::consts::LN_2).exp();
                Hit {
                    position: p,
                    score: (f64::from(text) * (1.0 + fresh)) as f32,
                }
            })
            .collect();
        top(&mut hits, limit);
        hits
    }
}

/// Keeps the best `limit` hits, best first (ties: the later-written memory first).
fn top(hits: &mut Vec<Hit>, limit: usize) {
    let by_score = |a: &Hit, b: &Hit| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| b.position.cmp(&a.position))
    };
    if limit == 0 {
        hits.clear();
        return;
    }
    if hits.len() > limit {
        hits.select_nth_unstable_by(limit - 1, by_score);
        hits.truncate(limit);
    }
    hits.sort_unstable_by(by_score);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, text: &str, updated_at: i64) -> MemoryRow {
        MemoryRow {
            seq,
            id: format!("mem_{seq}"),
            subject: "u".into(),
            memory: text.into(),
            metadata: "{}".into(),
            created_at: updated_at,
            updated_at,
            embedding: None,
        }
    }

    #[test]
    fn stop_words_are_sorted_for_binary_search() {
        assert!(STOP_WORDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn terms_are_stemmed_and_stop_words_dropped() {
        assert_eq!(terms("I moved to Lyon"), vec!["move", "lyon"]);
        assert_eq!(terms("Running, runs!"), vec!["run", "run"]);
    }

    #[test]
    fn the_best_match_comes_first_and_stems_meet() {
        let index = SubjectIndex::build(
            1,
            vec![
                row(1, "User likes hiking in the mountains", 0),
                row(2, "User is allergic to peanuts", 0),
                row(3, "User lives in Paris", 0),
                row(4, "unrelated filler text", 0),
                row(5, "more unrelated filler", 0),
            ],
        );
        let hits = index.search("Which allergies? peanut", None, 10, 0, 1e9);
        assert_eq!(index.doc(hits[0].position).id, "mem_2");
        assert!(index.search("zebra", None, 10, 0, 1e9).is_empty());
    }

    #[test]
    fn a_neighbour_of_a_match_is_found_and_ranks_below_it() {
        let index = SubjectIndex::build(
            1,
            vec![
                row(1, "Caroline: did you go to the support group?", 0),
                row(2, "Melanie: yes, yesterday, it was great", 0),
                row(3, "Caroline: I painted a lake", 0),
                row(4, "Melanie: nice colours", 0),
            ],
        );
        let hits = index.search("support group", None, 10, 0, 1e9);
        let ids: Vec<&str> = hits
            .iter()
            .map(|h| index.doc(h.position).id.as_str())
            .collect();
        assert_eq!(ids, vec!["mem_1", "mem_2"]);
    }

    #[test]
    fn recency_breaks_ties() {
        let day = 86_400;
        let index = SubjectIndex::build(
            1,
            vec![
                row(1, "User lives in Lyon", 100 * day),
                row(2, "a b c d e f g h", 0),
                row(3, "a b c d e f g h", 0),
                row(4, "User lives in Paris", 0),
            ],
        );
        let hits = index.search(
            "where does the user live",
            None,
            1,
            100 * day,
            30.0 * day as f64,
        );
        assert_eq!(index.doc(hits[0].position).id, "mem_1");
    }

    #[test]
    fn limit_keeps_the_best() {
        let rows = (0..100)
            .map(|i| {
                row(
                    i,
                    &format!("fact {i} about tea{}", "s".repeat((i % 3) as usize)),
                    0,
                )
            })
            .collect();
        let index = SubjectIndex::build(1, rows);
        let all = index.search("tea fact", None, 100, 0, 1e9);
        let top = index.search("tea fact", None, 5, 0, 1e9);
        assert_eq!(top.len(), 5);
        for (a, b) in all.iter().zip(&top) {
            assert_eq!(a.position, b.position);
        }
    }

    #[test]
    fn similarity_finds_what_shares_no_word_and_fuses_with_full_text() {
        let with = |seq: i64, text: &str, v: [f32; 3]| MemoryRow {
            embedding: Some(super::super::embed::encode(&v)),
            ..row(seq, text, 0)
        };
        let index = SubjectIndex::build(
            1,
            vec![
                with(1, "User is allergic to peanuts", [1.0, 0.1, 0.0]),
                with(2, "User lives in Lyon", [0.0, 1.0, 0.0]),
                with(3, "User plays the cello", [0.0, 0.0, 1.0]),
            ],
        );
        assert!(index.vector_work() > 0);
        let query = Vector::quantize(&[0.9, 0.0, 0.1]).unwrap();
        // No shared word: similarity alone ranks, the nearest first.
        let hits = index.search("nut intolerance", Some(&query), 2, 0, 1e9);
        assert_eq!(index.doc(hits[0].position).id, "mem_1");
        assert!(index.search("nut intolerance", None, 2, 0, 1e9).is_empty());
        // Both rankings agree on the cello: it comes first, above what only one names.
        let cello = Vector::quantize(&[0.0, 0.1, 1.0]).unwrap();
        let hits = index.search("cello", Some(&cello), 3, 0, 1e9);
        assert_eq!(index.doc(hits[0].position).id, "mem_3");
        assert_eq!(hits.len(), 3);
        // A query vector of other dimensions falls back to full text.
        let other = Vector::quantize(&[1.0, 0.0]).unwrap();
        let positions = |hits: Vec<Hit>| hits.iter().map(|h| h.position).collect::<Vec<_>>();
        assert_eq!(
            positions(index.search("cello", Some(&other), 3, 0, 1e9)),
            positions(index.search("cello", None, 3, 0, 1e9))
        );
    }
}
