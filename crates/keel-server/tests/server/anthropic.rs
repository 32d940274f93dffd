//! The gateway's Anthropic provider against `keel mock-llm`'s `/v1/messages` over real
//! TCP: OpenAI-shaped requests in, Anthropic Messages upstream, OpenAI-shaped answers out —
//! whole and streamed, text and tool calls — plus retries on 429/529 and a mid-stream
//! cut. The mock checks requests the way Anthropic does (roles, `max_tokens`, tool
//! pairing), so a translation mistake fails here as the 400 the real API would send.

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use keel_server::mock_llm::{Options, ScriptedReply, ScriptedToolCall};
use serde_json::{Value, json};

use crate::support::{gateway, gateway_with, start_mock};

fn target(model: &str) -> String {
    let base = if model.starts_with("scripted") {
        "SCRIPTED"
    } else {
        "MOCK"
    };
    format!(
        "[[models.m.targets]]\nprovider = \"anthropic\"\nmodel = \"{model}\"\nbase_url = \"{base}\"\n\
         api_key_env = \"TEST_ANTHROPIC_KEY\"\n"
    )
}

fn route(retry: &str, targets: &[&str]) -> String {
    let mut toml = format!("[models.m]\ntimeout = \"20s\"\n[models.m.retry]\n{retry}\n");
    for t in targets {
        toml.push_str(&target(t));
    }
    toml
}

fn hello() -> Value {
    json!({"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
    ], "max_tokens": 64})
}

fn weather_calls() -> Vec<ScriptedReply> {
    let call = |city: &str| ScriptedToolCall {
        name: "weather".to_owned(),
        arguments: json!({"city": city}),
    };
    vec![ScriptedReply {
        content: None,
        tool_calls: vec![call("Paris"), call("Tokyo")],
        usage: None,
    }]
}

fn weather_request() -> Value {
    json!({
        "model": "m",
        "messages": [{"role": "user", "content": "Weather in Paris and Tokyo?"}],
        "tools": [{"type": "function", "function": {
            "name": "weather", "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }}],
        "tool_choice": "required",
    })
}

/// Splits an SSE body into its `data` payloads.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// The JSON chunks of a stream that ended with `[DONE]`.
fn done_chunks(body: &str) -> Vec<Value> {
    let data = sse_data(body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn a_plain_completion_round_trips_through_the_messages_api() {
    let g = gateway(&route("max_attempts = 1", &["claude-echo"])).await;
    let (status, body) = g.chat(hello()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["model"], "m",
        "the public route name, not the upstream one"
    );
    assert!(v["id"].as_str().unwrap().starts_with("msg_"), "{v}");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "hello there");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // The mock counts words: "Be brief." went up as `system` (2) and "hello there" (2).
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6})
    );
    assert_eq!(g.calls("claude-echo").await, 1);
}

#[tokio::test]
async fn tool_calls_round_trip_as_tool_use_and_tool_result_blocks() {
    let toml = format!(
        "{}[models.tools]\n[models.tools.retry]\nmax_attempts = 1\n\
         [[models.tools.targets]]\nprovider = \"anthropic\"\nmodel = \"scripted\"\nbase_url = \"SCRIPTED\"\n",
        route("max_attempts = 1", &["claude-echo"])
    );
    let g = gateway_with(&toml, weather_calls()).await;

    let mut ask = weather_request();
    ask["model"] = json!("tools");
    let (status, body) = g.chat(ask.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let message = &v["choices"][0]["message"];
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        message["content"],
        Value::Null,
        "a message that only calls tools has no content"
    );
    let calls = message["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    for (call, (id, city)) in calls
        .iter()
        .zip([("toolu_0", "Paris"), ("toolu_1", "Tokyo")])
    {
        assert_eq!(
            (call["id"].as_str(), call["type"].as_str()),
            (Some(id), Some("function"))
        );
        assert_eq!(call["function"]["name"], "weather");
        let arguments = call["function"]["arguments"]
            .as_str()
            .expect("arguments are a JSON string");
        assert_eq!(
            serde_json::from_str::<Value>(arguments).unwrap(),
            json!({"city": city})
        );
    }

    // The follow-up goes to the echoing mock, which accepts it only if every tool_use is
    // answered at the start of the next user message, and echoes the results back.
    let mut follow_up = ask;
    follow_up["model"] = json!("m");
    let history = follow_up["messages"].as_array_mut().unwrap();
    history.push(message.clone());
    history.push(json!({"role": "tool", "tool_call_id": "toolu_0", "content": "22C in Paris"}));
    history.push(json!({"role": "tool", "tool_call_id": "toolu_1", "content": [{"type": "text", "text": "18C in Tokyo"}]}));
    let (status, body) = g.chat(follow_up.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "22C in Paris\n18C in Tokyo"
    );

    // Without the second result, upstream refuses the conversation: the caller's mistake.
    follow_up["messages"].as_array_mut().unwrap().pop();
    let (status, body) = g.chat(follow_up).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.contains("the provider rejected the request") && body.contains("toolu_1"),
        "{body}"
    );
}

#[tokio::test]
async fn unparseable_tool_arguments_are_refused_before_anything_is_sent() {
    let g = gateway(&route("max_attempts = 3", &["claude-echo"])).await;
    let request = json!({"model": "m", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]});
    let (status, body) = g.chat(request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.contains("messages[1].tool_calls[0].function.arguments"),
        "{body}"
    );
    assert_eq!(
        g.calls("claude-echo").await,
        0,
        "nothing went upstream, nothing was retried"
    );
}

#[tokio::test]
async fn openai_only_fields_are_translated_dropped_or_refused_never_sent() {
    let g = gateway(&route("max_attempts = 3", &["claude-echo"])).await;
    // The mock refuses any field outside the Messages schema, as Anthropic does, so a
    // 200 means none of these went up as they were.
    let mut req = hello();
    for (field, value) in [
        ("temperature", json!(0.7)),
        ("seed", json!(7)),
        ("presence_penalty", json!(0.5)),
        ("metadata", json!({"project": "p"})),
        ("safety_identifier", json!("end-user-1")),
        ("prompt_cache_key", json!("k")),
        ("modalities", json!(["text"])),
        ("verbosity", json!("low")),
        ("store", json!(false)),
    ] {
        req[field] = value;
    }
    let (status, body) = g.chat(req).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(g.calls("claude-echo").await, 1);

    for (field, value) in [
        ("temperature", json!(1.5)),
        ("audio", json!({"voice": "alloy", "format": "wav"})),
        ("functions", json!([{"name": "f", "parameters": {}}])),
    ] {
        let mut req = hello();
        req[field] = value;
        let (status, body) = g.chat(req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}: {body}");
        assert!(body.contains(&format!("{field}: ")), "{body}");
    }
    assert_eq!(
        g.calls("claude-echo").await,
        1,
        "refused before anything was sent, and not retried"
    );
}

#[tokio::test]
async fn prompt_cache_reads_and_writes_are_reported_and_priced_apart() {
    let prices = "input_price_per_mtok = 3.0\noutput_price_per_mtok = 15.0\n\
                  cached_input_price_per_mtok = 0.3\ncache_write_price_per_mtok = 3.75\n";
    let toml = format!(
        "{}{prices}[models.oai]\n[models.oai.retry]\nmax_attempts = 1\n\
         [[models.oai.targets]]\nprovider = \"openai\"\nmodel = \"scripted\"\nbase_url = \"SCRIPTED/v1\"\n\
         input_price_per_mtok = 2.0\noutput_price_per_mtok = 8.0\ncached_input_price_per_mtok = 0.5\n",
        route("max_attempts = 1", &["scripted"])
    );
    let usage: keel_llm::types::Usage = serde_json::from_value(json!({
        "prompt_tokens": 1000, "completion_tokens": 10, "total_tokens": 1010,
        "prompt_tokens_details": {"cached_tokens": 600, "cache_write_tokens": 300},
    }))
    .unwrap();
    let reply = ScriptedReply {
        content: Some("cached answer".to_owned()),
        tool_calls: Vec::new(),
        usage: Some(usage),
    };
    let mut g = gateway_with(&toml, vec![reply]).await;
    let reported = json!({"prompt_tokens": 1000, "completion_tokens": 10, "total_tokens": 1010,
                          "prompt_tokens_details": {"cached_tokens": 600, "cache_write_tokens": 300}});

    // Anthropic: the mock reports input_tokens 100, cache_read 600, cache_creation 300.
    let (status, body) = g.chat(hello()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["usage"], reported,
        "OpenAI counts: cache reads and writes included"
    );
    let mut streamed = hello();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, body) = g.chat(streamed).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(done_chunks(&body).last().unwrap()["usage"], reported);

    // OpenAI-compatible: `prompt_tokens_details.cached_tokens` as OpenAI sends it.
    let mut oai = hello();
    oai["model"] = json!("oai");
    let (status, body) = g.chat(oai).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let rows = g.usage(keel_store::GroupBy::Route).await;
    let row = |name: &str| rows.iter().find(|r| r.group == name).unwrap();
    let (m, oai) = (row("m"), row("oai"));
    assert_eq!(
        (m.requests, m.input_tokens, m.cached_tokens),
        (2, 2000, 1200)
    );
    // Per request: 100 fresh × $3 + 600 read × $0.3 + 300 written × $3.75 + 10 out × $15
    // = 1,755 USD per million tokens = 1,755,000 nano-USD.
    assert_eq!(m.cost_nanousd, 2 * 1_755_000, "{m:?}");
    // OpenAI: the unset write price is the input price: 100 × 2 + 600 × 0.5 + 300 × 2 + 10 × 8.
    assert_eq!(
        (oai.cached_tokens, oai.cost_nanousd),
        (600, 1_180_000),
        "{oai:?}"
    );
}

#[tokio::test]
async fn streamed_text_reassembles_and_ends_with_done_and_usage() {
    let g = gateway(&route("max_attempts = 1", &["fault/529", "claude-echo"])).await;
    let mut req = hello();
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let (status, body) = g.chat(req).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a stream that fails before its first byte falls back: {body}"
    );
    let chunks = done_chunks(&body);
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "hello there");
    assert!(
        chunks
            .iter()
            .all(|c| c["model"] == "m" && c["object"] == "chat.completion.chunk")
    );
    let finishes: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0].get("finish_reason"))
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!("stop")]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6})
    );
    assert_eq!(
        (g.calls("fault/529").await, g.calls("claude-echo").await),
        (1, 1)
    );
}

#[tokio::test]
async fn streamed_tool_calls_arrive_as_indexed_deltas() {
    let g = gateway_with(&route("max_attempts = 1", &["scripted"]), weather_calls()).await;
    let mut req = weather_request();
    req["stream"] = json!(true);
    let (status, body) = g.chat(req).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let chunks = done_chunks(&body);
    let mut ids = vec![String::new(); 2];
    let mut arguments = vec![String::new(); 2];
    let mut fragments = 0;
    for call in chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
    {
        let i = usize::try_from(call["index"].as_u64().unwrap()).unwrap();
        if let Some(id) = call["id"].as_str() {
            assert_eq!(
                (call["type"].as_str(), call["function"]["name"].as_str()),
                (Some("function"), Some("weather"))
            );
            ids[i] = id.to_owned();
        }
        arguments[i].push_str(call["function"]["arguments"].as_str().unwrap());
        fragments += 1;
    }
    assert_eq!(ids, ["toolu_0", "toolu_1"]);
    assert!(fragments > 4, "arguments came in fragments: {body}");
    assert_eq!(
        serde_json::from_str::<Value>(&arguments[0]).unwrap(),
        json!({"city": "Paris"})
    );
    assert_eq!(
        serde_json::from_str::<Value>(&arguments[1]).unwrap(),
        json!({"city": "Tokyo"})
    );
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str());
    assert_eq!(finish, Some("tool_calls"));
}

#[tokio::test]
async fn a_429_with_retry_after_is_retried_then_the_route_falls_back() {
    let g = gateway(&route(
        "max_attempts = 2\nmax_retry_after = \"5s\"",
        &["fault/429?retry_after=1", "claude-echo"],
    ))
    .await;
    let started = Instant::now();
    let (status, body) = g.chat(hello()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited the Retry-After second"
    );
    assert_eq!(g.calls("fault/429?retry_after=1").await, 2, "retried once");
    assert_eq!(g.calls("claude-echo").await, 1, "then fell back");
    let metrics = g.metrics().await;
    assert!(
        metrics.contains("target=\"anthropic/fault/429?retry_after=1@"),
        "{metrics}"
    );
    assert!(metrics.contains("kind=\"rate_limit\""), "{metrics}");
}

#[tokio::test]
async fn an_overloaded_529_is_a_server_error_and_is_retried() {
    let g = gateway(&route(
        "max_attempts = 2\nbase_delay = \"10ms\"",
        &["flaky/529?fail=1"],
    ))
    .await;
    let (status, body) = g.chat(hello()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(g.calls("flaky/529?fail=1").await, 2);
    assert!(g.metrics().await.contains("kind=\"server\""));
}

#[tokio::test]
async fn a_malformed_answer_is_a_502() {
    let g = gateway(&route("max_attempts = 1", &["fault/malformed"])).await;
    let (status, body) = g.chat(hello()).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("malformed JSON"), "{body}");
}

#[tokio::test]
async fn a_stream_cut_mid_way_ends_with_a_clean_error_event() {
    // message_start, ping, content_block_start, the first word; then the cut.
    let g = gateway(&route(
        "max_attempts = 2",
        &["fault/cut?after=4", "claude-echo"],
    ))
    .await;
    let mut req = hello();
    req["stream"] = json!(true);
    let (status, body) = g.chat(req).await;
    assert_eq!(status, StatusCode::OK);
    let data = sse_data(&body);
    assert_eq!(
        data.len(),
        3,
        "the role chunk, one word, then the error: {body}"
    );
    let word: Value = serde_json::from_str(&data[1]).unwrap();
    assert_eq!(word["choices"][0]["delta"]["content"], "hello ");
    let error: Value = serde_json::from_str(&data[2]).unwrap();
    assert_eq!(error["error"]["code"], "connect", "{error}");
    assert!(!body.contains("[DONE]"));
    assert_eq!(
        g.calls("claude-echo").await,
        0,
        "no fallback after the first byte"
    );
}

#[tokio::test]
async fn the_mock_checks_requests_the_way_anthropic_does() {
    let mock = start_mock(Options::default()).await;
    let client = reqwest::Client::new();
    let post = |body: Value, version: bool| {
        let mut req = client.post(format!("{mock}/v1/messages")).json(&body);
        if version {
            req = req.header("anthropic-version", "2023-06-01");
        }
        req.send()
    };
    let user = |content: Value| json!({"role": "user", "content": content});
    let ok = json!({"model": "x", "max_tokens": 8, "messages": [user(json!("hi"))]});

    let res = post(ok.clone(), false).await.unwrap();
    assert_eq!(res.status(), 400);
    let error: Value = res.json().await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("anthropic-version")
    );

    let res = post(ok, true).await.unwrap();
    assert_eq!(res.status(), 200);
    let message: Value = res.json().await.unwrap();
    assert_eq!(message["type"], "message");
    assert_eq!(message["content"], json!([{"type": "text", "text": "hi"}]));
    assert_eq!(message["stop_reason"], "end_turn");

    let tool_use = json!({"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]});
    let result = |id: &str| json!({"type": "tool_result", "tool_use_id": id, "content": "r"});
    for (messages, needle) in [
        (
            json!([{"role": "system", "content": "s"}, user(json!("hi"))]),
            "role",
        ),
        (
            json!([user(json!([{"type": "text", "text": ""}]))]),
            "non-empty",
        ),
        (
            json!([
                user(json!("hi")),
                tool_use.clone(),
                user(json!("no result"))
            ]),
            "without tool_result",
        ),
        (
            json!([
                user(json!("hi")),
                tool_use.clone(),
                user(json!([result("t1"), result("t2")]))
            ]),
            "unexpected tool_use_id",
        ),
        (
            json!([
                user(json!("hi")),
                tool_use,
                user(json!([{"type": "text", "text": "x"}, result("t1")]))
            ]),
            "must come first",
        ),
    ] {
        let res = post(
            json!({"model": "x", "max_tokens": 8, "messages": messages}),
            true,
        )
        .await
        .unwrap();
        assert_eq!(res.status(), 400, "{messages}");
        let error: Value = res.json().await.unwrap();
        assert!(
            error["error"]["message"].as_str().unwrap().contains(needle),
            "{error}"
        );
    }
    for (field, value, needle) in [
        ("seed", json!(1), "seed: Extra inputs are not permitted"),
        (
            "temperature",
            json!(1.5),
            "temperature: Input should be between 0 and 1",
        ),
        (
            "metadata",
            json!({"project": "p"}),
            "metadata.project: Extra inputs are not permitted",
        ),
    ] {
        let mut body = json!({"model": "x", "max_tokens": 8, "messages": [user(json!("hi"))]});
        body[field] = value;
        let res = post(body, true).await.unwrap();
        assert_eq!(res.status(), 400, "{field}");
        let error: Value = res.json().await.unwrap();
        assert!(
            error["error"]["message"].as_str().unwrap().contains(needle),
            "{error}"
        );
    }
    let own = json!({"model": "x", "max_tokens": 8, "messages": [user(json!("hi"))], "top_k": 5,
                     "temperature": 1.0, "metadata": {"user_id": "u"}, "stop_sequences": ["x"]});
    assert_eq!(
        post(own, true).await.unwrap().status(),
        200,
        "Anthropic's own fields"
    );
    let res = post(json!({"model": "x", "messages": [user(json!("hi"))]}), true)
        .await
        .unwrap();
    assert_eq!(res.status(), 400, "max_tokens is required");
    let stats: Value = reqwest::get(format!("{mock}/_mock/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["calls"]["x"], 2, "refused requests are not counted");
}
