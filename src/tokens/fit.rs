//! Which newest items of a history fit a token limit: the truncation rule shared by the
//! chat pre-flight and the Responses API's context assembly.
//!
//! Pinned items (system and developer messages, instructions, a memory slot) are not the
//! history: the caller keeps them out of `counts` and takes their tokens off the limit
//! first. What is left is cut from the oldest end, in whole groups: an item that must
//! stay with the one before it (a tool output with its tool call, a second output of
//! the same parallel call) never leaves or stays alone.

/// The index of the first item kept: `counts[first..]` is the longest suffix of whole
/// groups whose tokens add up to at most `limit`.
///
/// `counts` are the items' tokens, oldest first. `keep_together(i)` says that item `i`
/// must stay with item `i - 1` (it is never asked for `i = 0`); a group is an item and
/// every item after it that must stay with it.
///
/// # Errors
/// `Err(tokens)` when even the newest group does not fit: `tokens` is what that group
/// needs, the least any kept history would. An empty history fits (`Ok(0)`).
pub fn fit_newest(
    counts: &[u64],
    limit: u64,
    keep_together: impl Fn(usize) -> bool,
) -> Result<usize, u64> {
    let mut first = counts.len();
    let mut used: u64 = 0;
    while first > 0 {
        let mut start = first - 1;
        while start > 0 && keep_together(start) {
            start -= 1;
        }
        let group = counts[start..first]
            .iter()
            .fold(0u64, |sum, &n| sum.saturating_add(n));
        match used.checked_add(group) {
            Some(total) if total <= limit => {
                used = total;
                first = start;
            }
            _ if first == counts.len() => return Err(group),
            _ => break,
        }
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never(_: usize) -> bool {
        false
    }

    #[test]
    fn everything_fits_or_the_oldest_go() {
        assert_eq!(fit_newest(&[10, 20, 30], 60, never), Ok(0));
        assert_eq!(fit_newest(&[10, 20, 30], 59, never), Ok(1));
        assert_eq!(fit_newest(&[10, 20, 30], 50, never), Ok(1));
        assert_eq!(fit_newest(&[10, 20, 30], 49, never), Ok(2));
        assert_eq!(fit_newest(&[10, 20, 30], 30, never), Ok(2));
        assert_eq!(fit_newest(&[], 0, never), Ok(0));
    }

    #[test]
    fn the_newest_alone_too_big_is_an_error_with_its_size() {
        assert_eq!(fit_newest(&[10, 20, 30], 29, never), Err(30));
        assert_eq!(fit_newest(&[5], 0, never), Err(5));
        assert_eq!(fit_newest(&[0], 0, never), Ok(0));
    }

    #[test]
    fn a_tool_call_leaves_with_its_outputs() {
        // 0 user, 1 assistant with two tool calls, 2 and 3 their outputs, 4 assistant.
        let tool = |i: usize| i == 2 || i == 3;
        let counts = [100, 10, 20, 30, 5];
        // The group 1..=3 is 60: with the answer, 65.
        assert_eq!(fit_newest(&counts, 165, tool), Ok(0));
        assert_eq!(fit_newest(&counts, 164, tool), Ok(1));
        assert_eq!(fit_newest(&counts, 65, tool), Ok(1));
        // 64 cannot hold the group, and the outputs never stay without their call.
        assert_eq!(fit_newest(&counts, 64, tool), Ok(4));
        assert_eq!(fit_newest(&counts, 4, tool), Err(5));
    }

    #[test]
    fn a_newest_group_that_does_not_fit_is_reported_whole() {
        // The newest items are a call and its output: together 50.
        let tool = |i: usize| i == 2;
        assert_eq!(fit_newest(&[1, 20, 30], 49, tool), Err(50));
        assert_eq!(fit_newest(&[1, 20, 30], 50, tool), Ok(1));
        assert_eq!(fit_newest(&[1, 20, 30], 51, tool), Ok(0));
    }

    #[test]
    fn a_group_may_reach_the_oldest_item() {
        let tool = |i: usize| i <= 1;
        assert_eq!(fit_newest(&[7, 8, 9], 9, tool), Ok(2));
        assert_eq!(fit_newest(&[7, 8, 9], 23, tool), Ok(2));
        assert_eq!(fit_newest(&[7, 8, 9], 24, tool), Ok(0));
    }

    #[test]
    fn huge_counts_do_not_overflow() {
        assert_eq!(fit_newest(&[u64::MAX, u64::MAX, 1], u64::MAX, never), Ok(2));
        let together = |i: usize| i == 1;
        assert_eq!(
            fit_newest(&[u64::MAX, u64::MAX], u64::MAX - 1, together),
            Err(u64::MAX)
        );
    }
}
