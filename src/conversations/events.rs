//! A chat stream turned into the Responses API's event lifecycle.
//!
//! [`EventStream`] reads `chat.completion.chunk`s one at a time and writes, as each arrives,
//! the events the official SDK's stream helper accumulates: `response.output_item.added`
//! (a message with empty `content`, or a function call with empty `arguments`),
//! `response.content_part.added`, `response.output_text.delta` …, and on the last chunk
//! the matching `…done` events in output order, then `response.completed` (or
//! `response.incomplete`) carrying the whole response. Output indexes run 0, 1, 2 in the
//! order items start; sequence numbers rise by one per event across the stream.
//!
//! Nothing is buffered: every delta becomes its event in the same step.

use bytes::Bytes;
use serde_json::{Value, json};

use super::translate::{Ending, annotations};
use crate::wire::chat::{Chunk, FinishReason};
use crate::wire::responses::{
    FunctionCallItem, Item, ItemStatus, MessageItem, MessageRole, Part, ResponseObject, new_id,
};

/// Writes events as SSE frames (`event:` equal to the `type`), numbering them.
#[derive(Debug, Default)]
pub struct Sequencer {
    next: u64,
}

impl Sequencer {
    /// A sequencer whose next event is number `next` (a stream continued elsewhere).
    pub fn starting_at(next: u64) -> Sequencer {
        Sequencer { next }
    }

    /// One SSE frame: `type` and `sequence_number` are added to `fields`.
    pub fn frame(&mut self, kind: &str, mut fields: serde_json::Map<String, Value>) -> Bytes {
        fields.insert("type".into(), Value::String(kind.to_owned()));
        fields.insert("sequence_number".into(), Value::from(self.next));
        self.next += 1;
        let data = serde_json::to_string(&fields).unwrap_or_default();
        let mut out = String::with_capacity(data.len() + kind.len() + 16);
        out.push_str("event: ");
        out.push_str(kind);
        out.push_str("\ndata: ");
        out.push_str(&data);
        out.push_str("\n\n");
        Bytes::from(out)
    }

    /// A lifecycle event carrying the whole response.
    pub fn lifecycle(&mut self, kind: &str, response: &ResponseObject) -> Bytes {
        let mut fields = serde_json::Map::new();
        fields.insert(
            "response".into(),
            serde_json::to_value(response).unwrap_or(Value::Null),
        );
        self.frame(kind, fields)
    }
}

fn fields(value: Value) -> serde_json::Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    }
}

/// The output item being written.
#[derive(Debug)]
enum Slot {
    Message {
        id: String,
        /// Content parts in the order they started: text or refusal.
        parts: Vec<PartSlot>,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
        /// The chat stream's index of this tool call.
        index: u32,
    },
}

#[derive(Debug)]
enum PartSlot {
    Text(String),
    Refusal(String),
}

/// The Responses events of one chat stream. One item is open at a time: it is closed
/// (its `…done` events written) before the next one is added, as OpenAI streams them.
#[derive(Debug)]
pub struct EventStream {
    pub seq: Sequencer,
    /// Closed items, in output order.
    done: Vec<Item>,
    /// The item being written; its output index is `done.len()`.
    open: Option<Slot>,
    /// The chat tool-call index of each closed item (`None` for messages).
    call_indexes: Vec<Option<u32>>,
    /// Annotations of the answer's text (a replayed whole completion carries them).
    annotations: Vec<Value>,
    /// The id the next item opened takes (a replay names the stored items); fresh
    /// otherwise.
    next_id: Option<String>,
    ending: Ending,
}

impl EventStream {
    pub fn new(seq: Sequencer) -> EventStream {
        EventStream {
            seq,
            done: Vec::new(),
            open: None,
            call_indexes: Vec::new(),
            annotations: Vec::new(),
            next_id: None,
            ending: Ending::Completed,
        }
    }

    /// The events for one chunk, appended to `out`.
    pub fn chunk(&mut self, chunk: &Chunk<'_>, out: &mut Vec<Bytes>) {
        let Some(choice) = chunk.choices.iter().find(|c| c.index == 0) else {
            return;
        };
        let delta = &choice.delta;
        if let Some(Some(text)) = &delta.content
            && !text.is_empty()
        {
            self.text(text, false, out);
        }
        if let Some(Some(refusal)) = &delta.refusal
            && !refusal.is_empty()
        {
            self.text(refusal, true, out);
        }
        for call in delta.tool_calls.as_deref().unwrap_or_default() {
            let Some(function) = &call.function else {
                continue;
            };
            let piece = function.arguments.as_deref().unwrap_or_default();
            let is_open =
                matches!(&self.open, Some(Slot::Call { index, .. }) if *index == call.index);
            if !is_open {
                // A call that was closed already (deltas of parallel calls interleaved):
                // its arguments still complete the stored item.
                if let Some(Item::FunctionCall(done)) = self.closed_call(call.index) {
                    done.arguments.push_str(piece);
                    continue;
                }
                self.close_open(ItemStatus::Completed, out);
                let id = self.next_id.take().unwrap_or_else(|| new_id("fc"));
                let call_id = call
                    .id
                    .as_deref()
                    .map_or_else(|| new_id("call"), str::to_owned);
                let name = function.name.as_deref().unwrap_or_default().to_owned();
                out.push(self.seq.frame(
                    "response.output_item.added",
                    fields(json!({
                        "output_index": self.done.len(),
                        "item": {"type": "function_call", "id": id, "call_id": call_id,
                                 "name": name, "arguments": "", "status": "in_progress"},
                    })),
                ));
                self.open = Some(Slot::Call {
                    id,
                    call_id,
                    name,
                    arguments: String::new(),
                    index: call.index,
                });
            }
            if piece.is_empty() {
                continue;
            }
            let output_index = self.done.len();
            if let Some(Slot::Call { id, arguments, .. }) = &mut self.open {
                arguments.push_str(piece);
                let frame = json!({"item_id": id, "output_index": output_index, "delta": piece});
                out.push(
                    self.seq
                        .frame("response.function_call_arguments.delta", fields(frame)),
                );
            }
        }
        if let Some(reason) = &choice.finish_reason {
            self.ending = Ending::from_finish(Some(reason));
            if *reason == FinishReason::Length {
                self.ending = Ending::MaxOutputTokens;
            }
        }
    }

    /// The closed function call of a chat tool-call index, if any.
    fn closed_call(&mut self, index: u32) -> Option<&mut Item> {
        let position = self.call_indexes.iter().position(|i| *i == Some(index))?;
        self.done.get_mut(position)
    }

    /// Appends text (or refusal text) to the message, starting the message and the part
    /// when needed.
    fn text(&mut self, piece: &str, refusal: bool, out: &mut Vec<Bytes>) {
        if !matches!(self.open, Some(Slot::Message { .. })) {
            self.close_open(ItemStatus::Completed, out);
            let id = self.next_id.take().unwrap_or_else(|| new_id("msg"));
            out.push(self.seq.frame(
                "response.output_item.added",
                fields(json!({
                    "output_index": self.done.len(),
                    "item": {"type": "message", "id": id, "status": "in_progress",
                             "role": "assistant", "content": []},
                })),
            ));
            self.open = Some(Slot::Message {
                id,
                parts: Vec::new(),
            });
        }
        let output_index = self.done.len();
        let Some(Slot::Message { id, parts }) = &mut self.open else {
            return;
        };
        let wanted = |p: &PartSlot| matches!(p, PartSlot::Refusal(_)) == refusal;
        let content_index = match parts.iter().position(wanted) {
            Some(index) => index,
            None => {
                let index = parts.len();
                let part = if refusal {
                    parts.push(PartSlot::Refusal(String::new()));
                    json!({"type": "refusal", "refusal": ""})
                } else {
                    parts.push(PartSlot::Text(String::new()));
                    json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
                };
                let frame = json!({"item_id": id, "output_index": output_index,
                                   "content_index": index, "part": part});
                out.push(self.seq.frame("response.content_part.added", fields(frame)));
                index
            }
        };
        let (kind, frame) = match &mut parts[content_index] {
            PartSlot::Text(text) => {
                text.push_str(piece);
                (
                    "response.output_text.delta",
                    json!({"item_id": id, "output_index": output_index,
                           "content_index": content_index, "delta": piece, "logprobs": []}),
                )
            }
            PartSlot::Refusal(text) => {
                text.push_str(piece);
                (
                    "response.refusal.delta",
                    json!({"item_id": id, "output_index": output_index,
                           "content_index": content_index, "delta": piece}),
                )
            }
        };
        out.push(self.seq.frame(kind, fields(frame)));
    }

    /// Sets the annotations of the answer's text (a whole completion replayed as a
    /// stream carries them on its message); call before the message closes.
    pub fn set_annotations(&mut self, chat: Option<&[crate::wire::chat::Annotation]>) {
        self.annotations = annotations(chat);
    }

    /// How the answer ended (`length` → incomplete).
    pub fn ending(&self) -> Ending {
        self.ending
    }

    /// Closes the open item, if any: its `…done` events, then `output_item.done`.
    fn close_open(&mut self, status: ItemStatus, out: &mut Vec<Bytes>) {
        let Some(slot) = self.open.take() else {
            return;
        };
        let output_index = self.done.len();
        let (item, call_index) = match slot {
            Slot::Message { id, parts } => {
                let mut content = Vec::with_capacity(parts.len());
                for (content_index, part) in parts.into_iter().enumerate() {
                    let part = match part {
                        PartSlot::Text(text) => {
                            // Citations, each announced before the text is done.
                            for (annotation_index, annotation) in
                                self.annotations.iter().enumerate()
                            {
                                let frame = json!({"item_id": id, "output_index": output_index,
                                    "content_index": content_index,
                                    "annotation_index": annotation_index,
                                    "annotation": annotation});
                                out.push(
                                    self.seq.frame(
                                        "response.output_text.annotation.added",
                                        fields(frame),
                                    ),
                                );
                            }
                            let frame = json!({"item_id": id, "output_index": output_index,
                                "content_index": content_index, "text": text, "logprobs": []});
                            out.push(self.seq.frame("response.output_text.done", fields(frame)));
                            Part::OutputText {
                                text,
                                annotations: self.annotations.clone(),
                                logprobs: Vec::new(),
                            }
                        }
                        PartSlot::Refusal(refusal) => {
                            let frame = json!({"item_id": id, "output_index": output_index,
                                "content_index": content_index, "refusal": refusal});
                            out.push(self.seq.frame("response.refusal.done", fields(frame)));
                            Part::Refusal { refusal }
                        }
                    };
                    let frame = json!({"item_id": id, "output_index": output_index,
                        "content_index": content_index, "part": part});
                    out.push(self.seq.frame("response.content_part.done", fields(frame)));
                    content.push(part);
                }
                let item = Item::Message(MessageItem {
                    id,
                    status,
                    role: MessageRole::Assistant,
                    content,
                });
                (item, None)
            }
            Slot::Call {
                id,
                call_id,
                name,
                arguments,
                index,
            } => {
                let frame = json!({"item_id": id, "output_index": output_index,
                    "arguments": arguments, "name": name});
                out.push(
                    self.seq
                        .frame("response.function_call_arguments.done", fields(frame)),
                );
                let item = Item::FunctionCall(FunctionCallItem {
                    id,
                    call_id,
                    name,
                    arguments,
                    status,
                });
                (item, Some(index))
            }
        };
        let frame = json!({"output_index": output_index, "item": item});
        out.push(self.seq.frame("response.output_item.done", fields(frame)));
        self.done.push(item);
        self.call_indexes.push(call_index);
    }

    /// Closes the open item (with `status`: `incomplete` when the stream was cut) and
    /// returns every output item, in output order.
    /// The events of a whole item, as a stream would have written them: one delta per
    /// text part and per call's arguments. A turn whose steps ran server tools streams its
    /// items this way as each step ends; a replay streams a stored response.
    pub fn item(&mut self, item: &Item, out: &mut Vec<Bytes>) {
        match item {
            Item::Message(message) => {
                self.close_open(ItemStatus::Completed, out);
                self.next_id = Some(message.id.clone());
                for part in &message.content {
                    match part {
                        Part::OutputText {
                            text, annotations, ..
                        } => {
                            self.annotations.clone_from(annotations);
                            self.text(text, false, out);
                        }
                        Part::Refusal { refusal } => self.text(refusal, true, out),
                        _ => {}
                    }
                }
                self.close_open(message.status, out);
            }
            Item::FunctionCall(call) => {
                self.close_open(ItemStatus::Completed, out);
                self.next_id = Some(call.id.clone());
                let index = u32::try_from(self.done.len()).unwrap_or(u32::MAX);
                let chunk = json!({"choices": [{"index": 0, "delta": {"tool_calls": [{
                    "index": index, "id": call.call_id, "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments}}]}}]})
                .to_string();
                if let Ok(chunk) = serde_json::from_str::<Chunk<'_>>(&chunk) {
                    self.chunk(&chunk, out);
                }
                self.close_open(call.status, out);
            }
            Item::McpCall(call) => {
                self.close_open(ItemStatus::Completed, out);
                let output_index = self.done.len();
                let mut started = call.clone();
                started.arguments = String::new();
                started.output = None;
                started.error = None;
                started.status = ItemStatus::InProgress;
                out.push(self.seq.frame(
                    "response.output_item.added",
                    fields(json!({"output_index": output_index, "item": started})),
                ));
                let at = json!({"item_id": call.id, "output_index": output_index});
                let mut delta = fields(at.clone());
                delta.insert("delta".into(), Value::from(call.arguments.as_str()));
                out.push(self.seq.frame("response.mcp_call_arguments.delta", delta));
                let mut done = fields(at.clone());
                done.insert("arguments".into(), Value::from(call.arguments.as_str()));
                out.push(self.seq.frame("response.mcp_call_arguments.done", done));
                out.push(
                    self.seq
                        .frame("response.mcp_call.in_progress", fields(at.clone())),
                );
                let outcome = if call.error.is_some() {
                    "response.mcp_call.failed"
                } else {
                    "response.mcp_call.completed"
                };
                out.push(self.seq.frame(outcome, fields(at)));
                out.push(self.seq.frame(
                    "response.output_item.done",
                    fields(json!({"output_index": output_index, "item": call})),
                ));
                self.done.push(item.clone());
                self.call_indexes.push(None);
            }
            Item::McpListTools(list) => {
                self.close_open(ItemStatus::Completed, out);
                let output_index = self.done.len();
                let mut started = list.clone();
                started.tools = Vec::new();
                started.error = None;
                out.push(self.seq.frame(
                    "response.output_item.added",
                    fields(json!({"output_index": output_index, "item": started})),
                ));
                let at = json!({"item_id": list.id, "output_index": output_index});
                out.push(
                    self.seq
                        .frame("response.mcp_list_tools.in_progress", fields(at.clone())),
                );
                let outcome = if list.error.is_some() {
                    "response.mcp_list_tools.failed"
                } else {
                    "response.mcp_list_tools.completed"
                };
                out.push(self.seq.frame(outcome, fields(at)));
                out.push(self.seq.frame(
                    "response.output_item.done",
                    fields(json!({"output_index": output_index, "item": list})),
                ));
                self.done.push(item.clone());
                self.call_indexes.push(None);
            }
            // Whole at once: added and done.
            Item::McpApprovalRequest(_) | Item::McpApprovalResponse(_) => {
                self.close_open(ItemStatus::Completed, out);
                let output_index = self.done.len();
                for kind in ["response.output_item.added", "response.output_item.done"] {
                    out.push(self.seq.frame(
                        kind,
                        fields(json!({"output_index": output_index, "item": item})),
                    ));
                }
                self.done.push(item.clone());
                self.call_indexes.push(None);
            }
            Item::WebSearchCall(search) => {
                self.close_open(ItemStatus::Completed, out);
                let output_index = self.done.len();
                let mut started = search.clone();
                started.status = "in_progress".into();
                started.action.sources = Vec::new();
                started.output = None;
                out.push(self.seq.frame(
                    "response.output_item.added",
                    fields(json!({"output_index": output_index, "item": started})),
                ));
                let at = json!({"item_id": search.id, "output_index": output_index});
                out.push(
                    self.seq
                        .frame("response.web_search_call.in_progress", fields(at.clone())),
                );
                out.push(
                    self.seq
                        .frame("response.web_search_call.searching", fields(at.clone())),
                );
                out.push(
                    self.seq
                        .frame("response.web_search_call.completed", fields(at)),
                );
                out.push(self.seq.frame(
                    "response.output_item.done",
                    fields(json!({"output_index": output_index, "item": search})),
                ));
                self.done.push(item.clone());
                self.call_indexes.push(None);
            }
            Item::FunctionCallOutput(_) => {}
        }
    }

    pub fn finish(&mut self, status: ItemStatus, out: &mut Vec<Bytes>) -> Vec<Item> {
        self.close_open(status, out);
        self.call_indexes.clear();
        std::mem::take(&mut self.done)
    }
}

/// The events of a stored response, as its stream sent them: the lifecycle around one
/// delta per text part and per call's arguments. Sequence numbers are the same on every
/// replay, so a client can resume after the last one it saw.
pub fn replay(response: &ResponseObject) -> Vec<Bytes> {
    let mut seq = Sequencer::default();
    let mut started = response.clone();
    started.output = Vec::new();
    started.status = "in_progress".into();
    started.usage = None;
    started.completed_at = None;
    started.error = None;
    started.incomplete_details = None;
    let mut out = vec![
        seq.lifecycle("response.created", &started),
        seq.lifecycle("response.in_progress", &started),
    ];
    let mut events = EventStream::new(seq);
    for item in &response.output {
        events.item(item, &mut out);
    }
    events.close_open(ItemStatus::Completed, &mut out);
    let mut seq = events.seq;
    let kind = match response.status.as_str() {
        // A cancelled stream had no terminal event; its replay ends as incomplete.
        "incomplete" | "cancelled" => "response.incomplete",
        "failed" => "response.failed",
        _ => "response.completed",
    };
    out.push(seq.lifecycle(kind, response));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(json: &str) -> Chunk<'_> {
        serde_json::from_str(json).unwrap()
    }

    fn events(frames: &[Bytes]) -> Vec<Value> {
        frames
            .iter()
            .map(|f| {
                let text = std::str::from_utf8(f).unwrap();
                let (event, data) = text.split_once('\n').unwrap();
                let value: Value =
                    serde_json::from_str(data.trim_start_matches("data: ").trim()).unwrap();
                assert_eq!(event, format!("event: {}", value["type"].as_str().unwrap()));
                value
            })
            .collect()
    }

    #[test]
    fn text_then_tool_calls_make_the_sdk_lifecycle() {
        let mut stream = EventStream::new(Sequencer::default());
        let mut out = Vec::new();
        for c in [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"lo"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_9","type":"function","function":{"name":"f","arguments":""}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\":"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
        ] {
            stream.chunk(&chunk(c), &mut out);
        }
        let items = stream.finish(ItemStatus::Completed, &mut out);
        let events = events(&out);
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                // The message is closed before the call opens.
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
            ]
        );
        for (n, e) in events.iter().enumerate() {
            assert_eq!(e["sequence_number"], n as u64);
        }
        assert_eq!(events[0]["item"]["content"], json!([]));
        assert_eq!(events[4]["text"], "Hello");
        assert_eq!(events[6]["item"]["status"], "completed");
        assert_eq!(events[7]["output_index"], 1);
        assert_eq!(events[7]["item"]["arguments"], "");
        assert_eq!(events[10]["arguments"], "{\"a\":1}");
        assert_eq!(events[10]["name"], "f");
        assert_eq!(events[11]["item"]["status"], "completed");
        assert_eq!(items.len(), 2);
        let Item::FunctionCall(call) = &items[1] else {
            panic!()
        };
        assert_eq!(call.call_id, "call_9");
        assert_eq!(stream.ending(), Ending::Completed);
    }

    #[test]
    fn a_replay_names_the_stored_items_and_ends_as_the_response_did() {
        let mut stream = EventStream::new(Sequencer::default());
        let mut out = Vec::new();
        stream.chunk(
            &chunk(r#"{"choices":[{"index":0,"delta":{"content":"hi there"}}]}"#),
            &mut out,
        );
        stream.chunk(
            &chunk(r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"f","arguments":"{}"}}]}}]}"#),
            &mut out,
        );
        let output = stream.finish(ItemStatus::Completed, &mut out);
        let response: ResponseObject = serde_json::from_value(json!({
            "id": "resp_1", "object": "response", "created_at": 1, "status": "completed",
            "background": false, "completed_at": 2, "error": null, "incomplete_details": null,
            "instructions": null, "max_output_tokens": null, "max_tool_calls": null,
            "model": "m", "output": output, "parallel_tool_calls": true,
            "previous_response_id": null, "conversation": null, "prompt_cache_key": null,
            "reasoning": null, "safety_identifier": null, "service_tier": null, "store": true,
            "temperature": null, "text": {}, "tool_choice": "auto", "tools": [],
            "top_logprobs": null, "top_p": null, "truncation": "disabled", "usage": null,
            "user": null, "metadata": {}
        }))
        .unwrap();
        let replayed = events(&replay(&response));
        let kinds: Vec<&str> = replayed
            .iter()
            .map(|e| e["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds.first(), Some(&"response.created"));
        assert_eq!(kinds.last(), Some(&"response.completed"));
        assert_eq!(replayed[0]["response"]["output"], json!([]));
        let added: Vec<&Value> = replayed
            .iter()
            .filter(|e| e["type"] == "response.output_item.added")
            .collect();
        assert_eq!(added[0]["item"]["id"], response.output[0].id());
        assert_eq!(added[1]["item"]["id"], response.output[1].id());
        let text: Vec<&Value> = replayed
            .iter()
            .filter(|e| e["type"] == "response.output_text.done")
            .collect();
        assert_eq!(text[0]["text"], "hi there");
        assert_eq!(
            replay(&response),
            replay(&response),
            "the same numbering every time"
        );
    }

    #[test]
    fn a_length_finish_is_incomplete() {
        let mut stream = EventStream::new(Sequencer::default());
        let mut out = Vec::new();
        stream.chunk(
            &chunk(r#"{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"length"}]}"#),
            &mut out,
        );
        assert_eq!(stream.ending(), Ending::MaxOutputTokens);
    }
}
