// voxserve browser client for /v1/realtime (OpenAI Realtime protocol, GA event names).
//
// Microphone -> AudioWorklet -> 16-bit PCM at 24 kHz -> input_audio_buffer.append every 40 ms.
// Hands-free: the server detects turns (semantic_vad); push-to-talk: turn detection off, the
// client commits on release and asks for a response. Answer audio (response.output_audio.delta)
// is scheduled gap-free with Web Audio. Barge-in: on input_audio_buffer.speech_started (or a new
// push-to-talk press) playback stops at once and conversation.item.truncate tells the server how
// much of the answer was actually played, so its history keeps only what was heard.
// Tools: the page offers one function of its own (get_time) when "demo tool" is ticked; when a
// response is done, each function call it made is shown in the transcript, run here, and its
// result sent as a function_call_output item; a response.create then asks for the answer.
// Resume: session.created carries voxserve.resume_token; when the socket breaks, or the server
// moves the session (an error with code session_moved, then close 1012), the page reconnects with
// /v1/realtime?resume_token=... and backoff, and sends again the speech not yet committed.
// window.voxStats (mirrored as JSON in #stats) records what happened, for people and for tests.
"use strict";

const RATE = 24000;
const CHUNK = RATE * 40 / 1000; // samples per append
const $ = (id) => document.getElementById(id);

const WORKLET = `
class Capture extends AudioWorkletProcessor {
  constructor() { super(); this.buf = new Float32Array(${CHUNK}); this.n = 0; }
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (ch) {
      for (let i = 0; i < ch.length; i++) {
        this.buf[this.n++] = ch[i];
        if (this.n === this.buf.length) { this.port.postMessage(this.buf.slice(0)); this.n = 0; }
      }
    }
    return true;
  }
}
registerProcessor("pcm-capture", Capture);`;

const stats = {
  connected: false, sessionId: "", mode: "", micChunks: 0, speechStarted: 0,
  userTranscripts: [], assistantTexts: [], responsesCompleted: 0, responsesCancelled: 0,
  audioMs: 0, rms: 0, playedRms: 0, bargeIns: 0, latencies: [], errors: [], toolCalls: [],
};

// --- the page's own tool ---------------------------------------------------------------------------

const TOOLS = {
  get_time: {
    description: "The current local date and time of the user, optionally in another IANA time zone.",
    parameters: { type: "object", properties: { timezone: { type: "string", description: "e.g. Europe/Paris" } } },
    run({ timezone }) {
      const opts = { weekday: "long", hour: "2-digit", minute: "2-digit", timeZone: timezone || undefined };
      try {
        return { time: new Date().toLocaleString("en-GB", opts), timezone: timezone || "local" };
      } catch (err) {
        return { error: `unknown time zone ${timezone}` };
      }
    },
  },
};

window.voxStats = stats;

let ws = null, ctx = null, micStream = null, micNode = null, master = null, analyser = null;
let ready = false;  // the session has our settings (session.updated): audio may flow
let talking = false, playHead = 0, current = null, sumSq = 0, samples = 0, meterTimer = null;
let speechStoppedAt = null;  // performance.now() when the user's turn ended (client view)
let resumeToken = "", retryMs = 200, reconnectTimer = null, retries = 0;
let unsent = [];  // audio appends since the last commit: sent again after a resume
const bubbles = new Map();   // item id -> element

function mode() { return document.querySelector("input[name=mode]:checked").value; }

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function publish() { $("stats").textContent = JSON.stringify(stats, null, 1); }

function send(event) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

// --- audio helpers ------------------------------------------------------------------------------

function toBase64(int16) {
  const bytes = new Uint8Array(int16.buffer, int16.byteOffset, int16.byteLength);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function fromBase64(b64) {
  const s = atob(b64);
  const bytes = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
  const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
  const out = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 32768;
  return out;
}

function onMicFrame(frame) {
  let peak = 0;
  for (let i = 0; i < frame.length; i++) peak = Math.max(peak, Math.abs(frame[i]));
  $("meter").firstElementChild.style.width = Math.min(100, peak * 140) + "%";
  if (!micStream || (mode() === "push-to-talk" && !talking)) return;
  const pcm = new Int16Array(frame.length);
  for (let i = 0; i < frame.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, Math.round(frame[i] * 32767)));
  const append = { type: "input_audio_buffer.append", audio: toBase64(pcm) };
  unsent.push(append);  // kept until committed: sent again after a resume
  if (unsent.length > 750) unsent.shift();  // 30 s of speech at most
  if (!ready) return;  // reconnecting: it goes out with the replay, in order
  send(append);
  stats.micChunks++;
}

// --- playback -----------------------------------------------------------------------------------

function isPlaying() { return current !== null && !current.stopped && ctx.currentTime < playHead; }

function playedMs() {
  if (!current || current.scheduledMs === 0) return 0;
  const elapsed = (ctx.currentTime - current.startTime) * 1000 - current.gapMs;
  return Math.max(0, Math.min(current.scheduledMs, elapsed));
}

function play(event) {
  if (current && current.itemId === event.item_id && current.stopped) return; // cut off: drop the rest
  const audio = fromBase64(event.delta);
  if (!audio.length) return;
  for (let i = 0; i < audio.length; i++) sumSq += audio[i] * audio[i];
  samples += audio.length;
  stats.audioMs += 1000 * audio.length / RATE;
  stats.rms = Math.sqrt(sumSq / samples);
  if (!current || current.itemId !== event.item_id) {
    current = { itemId: event.item_id, responseId: event.response_id, startTime: 0, scheduledMs: 0, gapMs: 0,
                sources: new Set(), stopped: false };
  }
  const buffer = ctx.createBuffer(1, audio.length, RATE);
  buffer.copyToChannel(audio, 0);
  const src = ctx.createBufferSource();
  src.buffer = buffer;
  src.connect(master);
  const at = Math.max(playHead, ctx.currentTime + 0.03);
  if (current.scheduledMs === 0) current.startTime = at;
  else if (at > playHead) current.gapMs += (at - playHead) * 1000; // an underrun: silence in between
  src.start(at);
  playHead = at + buffer.duration;
  current.scheduledMs += 1000 * buffer.duration;
  current.sources.add(src);
  const c = current;
  src.onended = () => c.sources.delete(src);
}

// Stop the answer now and tell the server what the user heard of it.
function bargeIn() {
  if (!isPlaying()) return;
  const heard = Math.floor(playedMs());
  current.stopped = true;
  for (const src of current.sources) { try { src.stop(); } catch (e) { /* already ended */ } }
  current.sources.clear();
  playHead = ctx.currentTime;
  send({ type: "conversation.item.truncate", item_id: current.itemId, content_index: 0, audio_end_ms: heard });
  stats.bargeIns++;
}

function sampleOutput() {
  if (!analyser) return;
  const data = new Float32Array(analyser.fftSize);
  analyser.getFloatTimeDomainData(data);
  let s = 0;
  for (let i = 0; i < data.length; i++) s += data[i] * data[i];
  stats.playedRms = Math.max(stats.playedRms, Math.sqrt(s / data.length));
}

// --- the transcript -----------------------------------------------------------------------------

function bubble(itemId, role) {
  let el = bubbles.get(itemId);
  if (!el) {
    el = document.createElement("div");
    el.className = "turn " + role;
    el.innerHTML = `<span class="who">${role === "user" ? "you" : "assistant"}</span><span class="text"></span>`;
    $("log").appendChild(el);
    bubbles.set(itemId, el);
    el.scrollIntoView({ block: "end" });
  }
  return el;
}

function latencyLine(response, clientMs) {
  const vox = response.voxserve || {};
  const lat = vox.latency || {};
  const parts = [];
  if (lat.voice_to_voice_ms) parts.push(`voice-to-voice ${Math.round(lat.voice_to_voice_ms)} ms`);
  else if (lat.first_audio_ms) parts.push(`first audio ${Math.round(lat.first_audio_ms)} ms`);
  if (clientMs !== null) parts.push(`answer audio ${Math.round(clientMs)} ms after your turn ended (browser)`);
  if (lat.asr_ms) parts.push(`ASR ${Math.round(lat.asr_ms)}`);
  if (lat.llm_first_token_ms) parts.push(`LLM first token ${Math.round(lat.llm_first_token_ms)}`);
  if (lat.tts_first_audio_ms) parts.push(`TTS first audio ${Math.round(lat.tts_first_audio_ms)}`);
  if (lat.speculative) parts.push("speculative");
  return parts.join(" · ");
}

// --- protocol -----------------------------------------------------------------------------------

let firstAudioAt = null;

function onEvent(e) {
  switch (e.type) {
    case "session.created":
      stats.connected = true;
      stats.sessionId = e.session.id;
      resumeToken = (e.voxserve || {}).resume_token || "";
      retryMs = 200;
      retries = 0;
      if ((e.voxserve || {}).resumed) {
        stats.resumed = (stats.resumed || 0) + 1;
        setStatus("Reconnected: the conversation goes on.");
      }
      send(sessionUpdate());
      break;
    case "session.updated":
      if (!micStream) startMic();
      else if (!ready) {  // resumed: first what the server had not taken in, then live audio
        for (const append of unsent) send(append);
        ready = true;
      }
      break;
    case "input_audio_buffer.speech_started":
      stats.speechStarted++;
      bargeIn();
      setStatus("Hearing you…");
      break;
    case "input_audio_buffer.speech_stopped":
      speechStoppedAt = performance.now();
      setStatus("Thinking…");
      break;
    case "input_audio_buffer.committed":
      unsent = [];
      if (speechStoppedAt === null) speechStoppedAt = performance.now();
      break;
    case "conversation.item.added":
      if (e.item.role === "user") {
        const el = bubble(e.item.id, "user");
        const part = e.item.content[0] || {};
        el.querySelector(".text").textContent = part.text || "…";
      } else if (e.item.role === "assistant") {
        bubble(e.item.id, "assistant");
      } else if (e.item.type === "function_call_output") {
        const call = bubbles.get(e.item.call_id);
        if (call) call.querySelector(".result").textContent = "→ " + e.item.output;
      }
      break;

    case "conversation.item.input_audio_transcription.completed":
      bubble(e.item_id, "user").querySelector(".text").textContent = e.transcript || "(no words)";
      stats.userTranscripts.push(e.transcript);
      break;
    case "response.created":
      firstAudioAt = null;
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      bubble(e.item_id, "assistant").querySelector(".text").textContent += e.delta;
      break;
    case "response.output_audio.delta":
      if (firstAudioAt === null) firstAudioAt = performance.now();
      play(e);
      break;
    case "response.done": {
      const r = e.response;
      const item = (r.output || []).find((o) => o.type === "message");
      // calls made (not those off their schema: incomplete): run them, send the outputs, then
      // ask for the answer that uses them
      const calls = (r.output || []).filter((o) => o.type === "function_call" && o.status === "completed");
      if (r.status === "completed" && calls.length) {
        calls.forEach(runTool);
        send({ type: "response.create" });
      }
      const clientMs = speechStoppedAt !== null && firstAudioAt !== null ? firstAudioAt - speechStoppedAt : null;
      speechStoppedAt = null;
      if (r.status === "completed") stats.responsesCompleted++;
      else stats.responsesCancelled++;
      if (item) {
        const el = bubble(item.id, "assistant");
        const part = item.content[0] || {};
        stats.assistantTexts.push(part.transcript || part.text || "");
        if (r.status !== "completed") el.classList.add("interrupted");
        const line = document.createElement("div");
        line.className = "latency";
        line.textContent = latencyLine(r, clientMs);
        el.appendChild(line);
      }
      stats.latencies.push({ status: r.status, client_ms: clientMs, ...((r.voxserve || {}).latency || {}) });
      setStatus(mode() === "hands-free" ? "Listening: just speak." : "Hold the button (or space) while you speak.");
      break;
    }
    case "error":
      if (e.error.code === "session_moved") {  // the server restarts: come back with the new token
        resumeToken = (e.voxserve || {}).resume_token || resumeToken;
        setStatus("The server is moving this call; reconnecting…");
        break;
      }
      if (e.error.code === "function_call_cancelled") {  // the user spoke on: no answer waits for it
        const call = bubbles.get((e.voxserve || {}).call_id);
        if (call) call.classList.add("cancelled");
        break;
      }
      stats.errors.push(e.error);
      setStatus(`error ${e.error.code}: ${e.error.message}`, true);
      break;
  }
  publish();
}

function runTool(e) {  // e: a function_call item (name, call_id, arguments)
  const el = document.createElement("div");
  el.className = "turn tool";
  el.innerHTML = `<span class="who">tool call</span><span class="call"></span><span class="result">…</span>`;
  el.querySelector(".call").textContent = `${e.name}(${e.arguments})`;
  $("log").appendChild(el);
  bubbles.set(e.call_id, el);
  const tool = TOOLS[e.name];
  let output;
  try {
    output = tool ? tool.run(JSON.parse(e.arguments || "{}")) : { error: `no tool ${e.name} on this page` };
  } catch (err) {
    output = { error: String(err) };
  }
  stats.toolCalls.push({ name: e.name, arguments: e.arguments, output });
  send({ type: "conversation.item.create", item: { type: "function_call_output", call_id: e.call_id,
                                                   output: JSON.stringify(output) } });
}

function sessionUpdate() {
  const handsFree = mode() === "hands-free";
  stats.mode = mode();
  const tools = $("tools").checked ? Object.entries(TOOLS).map(([name, t]) => (
    { type: "function", name, description: t.description, parameters: t.parameters })) : [];
  return {
    type: "session.update",
    session: {
      type: "realtime",
      output_modalities: ["audio"],
      tools,
      audio: {
        input: {
          format: { type: "audio/pcm", rate: RATE },
          transcription: { model: "whisper-1" },
          turn_detection: handsFree ? { type: "semantic_vad", create_response: true, interrupt_response: true } : null,
        },
        output: { format: { type: "audio/pcm", rate: RATE } },
      },
    },
  };
}

// --- start / stop / push-to-talk ----------------------------------------------------------------

async function start() {
  $("start").disabled = true;
  setStatus("Connecting…");
  try {
    ctx = new AudioContext({ sampleRate: RATE });  // made in the click: browsers let it play then
    await ctx.resume();
    master = ctx.createGain();
    analyser = ctx.createAnalyser();
    analyser.fftSize = 2048;
    master.connect(ctx.destination);
    master.connect(analyser);
    meterTimer = setInterval(sampleOutput, 50);
  } catch (err) {
    fail(`audio output unavailable: ${err.message}`);
    return;
  }
  resumeToken = "";
  connect();
  $("stop").disabled = false;
  for (const r of document.querySelectorAll("input[name=mode]")) r.disabled = true;
}

function connect() {
  const key = $("key").value.trim();
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const resume = resumeToken ? `&resume_token=${encodeURIComponent(resumeToken)}` : "";
  ws = new WebSocket(`${scheme}${location.host}/v1/realtime?model=voxserve${resume}`,
                     key ? ["realtime", "openai-insecure-api-key." + key] : ["realtime"]);
  const socket = ws;
  ws.onmessage = (m) => onEvent(JSON.parse(m.data));
  ws.onclose = (c) => {
    stats.connected = false;
    publish();
    if (ws !== socket) return;  // closed by the Stop button
    if (resumeToken && c.code !== 1000 && c.code !== 1008 && retries < 20) {  // broken or moved: resume
      ready = false;
      retries++;
      setStatus(`connection lost (${c.code}); reconnecting in ${(retryMs / 1000).toFixed(1)} s…`, true);
      reconnectTimer = setTimeout(() => { reconnectTimer = null; if (ws === socket) connect(); }, retryMs);
      retryMs = Math.min(5000, retryMs * 2);
      return;
    }
    setStatus(`disconnected (${c.code}${c.reason ? ": " + c.reason : ""})`, c.code !== 1000);
    stop();
  };
  ws.onerror = () => { if (!resumeToken) setStatus("connection failed (wrong API key, or server down?)", true); };
}

// The microphone opens once the server has our settings, so no word is spoken into a session
// that is not ready for it.
async function startMic() {
  try {
    micStream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true } });
    await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([WORKLET], { type: "text/javascript" })));
    micNode = new AudioWorkletNode(ctx, "pcm-capture");
    micNode.port.onmessage = (m) => onMicFrame(m.data);
    const sink = ctx.createGain(); // keeps the worklet pulled by the graph, silently
    sink.gain.value = 0;
    ctx.createMediaStreamSource(micStream).connect(micNode);
    micNode.connect(sink).connect(ctx.destination);
  } catch (err) {
    fail(`microphone unavailable: ${err.message} (the page needs https or localhost, and mic permission)`);
    return;
  }
  ready = true;
  $("talk").disabled = mode() !== "push-to-talk";
  setStatus(mode() === "hands-free" ? "Listening: just speak." : "Hold the button (or space) while you speak.");
}

function fail(message) {
  setStatus(message, true);
  stats.errors.push({ code: "browser", message });
  publish();
  stop();
}

function stop() {
  if (reconnectTimer) { clearTimeout(reconnectTimer); reconnectTimer = null; }
  if (ws) { const w = ws; ws = null; try { w.close(1000); } catch (e) { /* closed */ } }
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  if (meterTimer) clearInterval(meterTimer);
  if (ctx) ctx.close();
  ctx = micStream = micNode = master = analyser = null;
  ready = false;
  current = null;
  playHead = 0;
  $("start").disabled = false;
  $("stop").disabled = true;
  $("talk").disabled = true;
  for (const r of document.querySelectorAll("input[name=mode]")) r.disabled = false;
}

function pressTalk() {
  if (talking || !ws || mode() !== "push-to-talk") return;
  bargeIn();
  send({ type: "input_audio_buffer.clear" });
  talking = true;
  $("talk").classList.add("active");
  setStatus("Listening… release to send.");
}

function releaseTalk() {
  if (!talking) return;
  talking = false;
  $("talk").classList.remove("active");
  speechStoppedAt = performance.now();
  send({ type: "input_audio_buffer.commit" });
  send({ type: "response.create" });
  setStatus("Thinking…");
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", () => { setStatus("Stopped."); stop(); });
$("talk").addEventListener("pointerdown", pressTalk);
$("talk").addEventListener("pointerup", releaseTalk);
$("talk").addEventListener("pointerleave", releaseTalk);
document.addEventListener("keydown", (e) => { if (e.code === "Space" && !e.repeat && e.target.tagName !== "INPUT") {
  e.preventDefault(); pressTalk(); } });
document.addEventListener("keyup", (e) => { if (e.code === "Space") releaseTalk(); });
publish();
