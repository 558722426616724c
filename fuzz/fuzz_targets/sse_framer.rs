//! The SSE framer: upstream bytes → events.
//!
//! Property: the same events come out, byte for byte and in order, however the bytes are
//! cut into reads; every event is parsed without a panic. The first byte of the input
//! chooses the cut points, the rest is the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::wire::sse::{SseFramer, parse_event};

/// Frames `stream` fed in pieces ending at `cuts`: the events, then what `finish` returns.
fn frame(stream: &[u8], cuts: &[usize]) -> Option<(Vec<Vec<u8>>, Option<Vec<u8>>)> {
    let mut framer = SseFramer::new();
    let mut events = Vec::new();
    let mut from = 0;
    for &cut in cuts.iter().chain([&stream.len()]) {
        framer.push(&stream[from..cut]).ok()?;
        from = cut;
        while let Some(event) = framer.next_event() {
            events.push(event.to_vec());
        }
    }
    Some((events, framer.finish().map(|rest| rest.to_vec())))
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(seed % 17) + 1;
    let cuts: Vec<usize> = (step..stream.len()).step_by(step).collect();
    let whole = frame(stream, &[]);
    let pieces = frame(stream, &cuts);
    let bytewise = frame(stream, &(1..stream.len()).collect::<Vec<_>>());
    match (&whole, &pieces, &bytewise) {
        (Some(whole), Some(pieces), Some(bytewise)) => {
            assert_eq!(whole, pieces);
            assert_eq!(whole, bytewise);
            for event in whole.0.iter().chain(&whole.1) {
                let _ = parse_event(event);
                let _ = switchyard::wire::event::inspect(event);
            }
        }
        // Too large an event is refused however it arrives.
        (None, None, None) => {}
        _ => panic!("an oversized event was refused for some cuts only"),
    }
});
