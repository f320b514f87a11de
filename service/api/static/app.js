// speech-serve page: Live (microphone -> live transcript) and File (upload -> transcript or
// subtitles). Talks only to this origin's public API; the live protocol lives in transport.js.
// No innerHTML anywhere: the page's CSP enforces Trusted Types.

import { LiveTranscriber } from "/static/transport.js";

const $ = (id) => document.getElementById(id);

const state = {
  config: null,  // /ui/config: model, language, rate, limits
  apiKey: null,  // in memory only, never stored
};

// ---------------------------------------------------------------- API helpers

function authHeaders() {
  return state.apiKey ? { Authorization: `Bearer ${state.apiKey}` } : {};
}

function api(path, init = {}) {
  return fetch(path, { ...init, headers: { ...authHeaders(), ...(init.headers || {}) } });
}

/** The API's own error message (OpenAI error shape), or the HTTP status when there is none. */
async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      message = body.error.message;
      code = body.error.code || null;
    }
  } catch {
    // not JSON: keep the status line
  }
  return { status: response.status, message, code };
}

function toast(text) {
  const element = $("toast");
  element.textContent = text;
  element.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { element.hidden = true; }, 2200);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---------------------------------------------------------------- model and key

async function loadConfig() {
  let response;
  try {
    response = await api("/ui/config");
  } catch {
    setModelLine("Service unreachable", "bad");
    setTimeout(loadConfig, 3000);
    return;
  }
  if (response.status === 401) {
    const refused = state.apiKey !== null;
    state.apiKey = null;
    askForKey(refused ? "That key was refused: check it and try again." : null);
    setModelLine("API key required", "warn");
    $("docs-link").hidden = true;  // the docs page cannot send a key
    return;
  }
  if (!response.ok) {
    const error = await errorOf(response);
    setModelLine(response.status === 503 ? "Model loading…" : error.message, "bad");
    setTimeout(loadConfig, response.status === 503 ? 2000 : 5000);
    return;
  }
  state.config = await response.json();
  $("key-form").hidden = true;
  const { model, language, sampling_rate: rate, auth } = state.config;
  setModelLine(model, "ok");
  document.title = `${model} · speech-serve`;
  $("model").title = `${state.config.architecture}, ${rate} Hz`;
  $("model-language").textContent = language;
  $("model-language").title = "Language";
  $("model-language").hidden = false;
  $("model-rate").textContent = `${rate / 1000} kHz`;
  $("model-rate").hidden = false;
  $("docs-link").hidden = auth;  // the docs page cannot send a key
  $("record").disabled = false;
  if (!upload.file) $("drop-hint").textContent = uploadHint();
  updateTranscribeButton();
}

function setModelLine(text, status) {
  $("model-name").textContent = text;
  $("model-dot").className = `dot ${status}`;
  if (status !== "ok") {
    $("model-language").hidden = true;
    $("model-rate").hidden = true;
  }
}

function askForKey(problem) {
  $("key-form").hidden = false;
  $("key-hint").textContent = problem || "Kept in this tab's memory only: reloading the page forgets it.";
  $("key-hint").classList.toggle("bad", Boolean(problem));
  $("key-input").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  state.apiKey = key;
  $("key-input").value = "";
  loadConfig();
});

// ---------------------------------------------------------------- tabs

function selectTab(name) {
  for (const tab of ["live", "file"]) {
    const selected = tab === name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(selected));
    $(`tab-${tab}`).tabIndex = selected ? 0 : -1;
    $(`panel-${tab}`).hidden = !selected;
  }
}

$("tab-live").addEventListener("click", () => { selectTab("live"); history.replaceState(null, "", "#live"); });
$("tab-file").addEventListener("click", () => { selectTab("file"); history.replaceState(null, "", "#file"); });
document.querySelector(".tabs").addEventListener("keydown", (event) => {
  if (event.key !== "ArrowLeft" && event.key !== "ArrowRight") return;
  const next = $("tab-live").getAttribute("aria-selected") === "true" ? "file" : "live";
  $(`tab-${next}`).click();
  $(`tab-${next}`).focus();
});
if (location.hash === "#file") selectTab("file");

// ---------------------------------------------------------------- live

const live = {
  transcriber: null,
  context: null,
  stream: null,
  source: null,
  node: null,
  recording: false,
  busy: false,
  level: 0,
  rows: new Map(),  // utterance index -> <li>
};

function clock(seconds) {
  const minutes = Math.floor(seconds / 60);
  return `${minutes}:${(seconds - minutes * 60).toFixed(1).padStart(4, "0")}`;
}

function setLiveState(text, bad = false) {
  $("live-state").textContent = text;
  $("live-state").classList.toggle("bad", bad);
}

function setRecording(recording) {
  live.recording = recording;
  $("record").setAttribute("aria-pressed", String(recording));
  $("record-label").textContent = recording ? "Stop recording" : "Start recording";
  $("record").title = recording ? "Stop" : "Record";
}

async function microphone() {
  if (!window.isSecureContext || !navigator.mediaDevices || !window.AudioWorkletNode) {
    throw new Error("The microphone needs a secure page: open it over HTTPS, or on localhost.");
  }
  try {
    // The browser's voice processing changes levels and cuts quiet speech: ask for raw audio.
    return await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
  } catch (error) {
    if (error.name === "NotAllowedError") throw new Error("Microphone access was denied: allow it in the site settings.");
    if (error.name === "NotFoundError") throw new Error("No microphone found.");
    throw new Error(`Microphone unavailable: ${error.message}`);
  }
}

/** An audio context at the model's rate, made at once: some browsers (Safari) only let a
 * context start inside the click that asked for it. */
function modelRateContext() {
  try {
    return new AudioContext({ sampleRate: state.config.sampling_rate, latencyHint: "interactive" });
  } catch {
    return new AudioContext({ latencyHint: "interactive" });
  }
}

/** The microphone as a node of `context`; where the browser cannot resample the microphone to
 * that rate, a new context at the device's own rate (the server resamples what we send). */
async function captureGraph(context, stream) {
  const attempt = async (candidate) => {
    try {
      await candidate.audioWorklet.addModule("/static/capture-worklet.js");
      return { context: candidate, source: candidate.createMediaStreamSource(stream) };
    } catch (error) {
      candidate.close();
      throw error;
    }
  };
  try {
    return await attempt(context);
  } catch {
    return attempt(new AudioContext({ latencyHint: "interactive" }));
  }
}

async function startLive() {
  live.busy = true;
  $("record").disabled = true;
  setLiveState("Starting…");
  try {
    live.context = modelRateContext();
    live.stream = await microphone();
    const { context, source } = await captureGraph(live.context, live.stream);
    live.context = context;
    live.source = source;
    live.transcriber = new LiveTranscriber({
      sampleRate: context.sampleRate,
      apiKey: state.apiKey,
      onEvent: onLiveEvent,
    });
    await live.transcriber.open();
    live.node = new AudioWorkletNode(context, "pcm-capture", { processorOptions: { chunkMs: 50 } });
    live.node.port.onmessage = ({ data }) => {
      live.transcriber.send(data.pcm);
      showLevel(data.peak);
      $("elapsed").textContent = clock(live.transcriber.sentSeconds).replace(/\.\d$/, "");
    };
    const mute = context.createGain();  // keeps the graph pulled without playing anything
    mute.gain.value = 0;
    source.connect(live.node).connect(mute).connect(context.destination);
    await context.resume();
    setRecording(true);
    setLiveState("Listening…");
    $("live-empty").hidden = true;
  } catch (error) {
    await teardownCapture();
    if (live.transcriber) live.transcriber.close();
    live.transcriber = null;
    setLiveState(error.message, true);
  } finally {
    live.busy = false;
    $("record").disabled = !state.config;
  }
}

async function teardownCapture() {
  if (live.source) live.source.disconnect();
  if (live.node) live.node.port.onmessage = null;
  if (live.stream) for (const track of live.stream.getTracks()) track.stop();
  if (live.context) await live.context.close().catch(() => {});
  Object.assign(live, { source: null, node: null, stream: null, context: null });
  live.level = 0;
  showLevel(0);
}

async function stopLive() {
  live.busy = true;
  $("record").disabled = true;
  setRecording(false);
  await teardownCapture();
  setLiveState("Finishing the last words…");
  const transcriber = live.transcriber;
  if (transcriber) await transcriber.finish();
  if (live.transcriber === transcriber) {
    live.transcriber = null;
    setLiveState("Stopped. Press the microphone to go on.");
  }
  live.busy = false;
  $("record").disabled = false;
}

$("record").addEventListener("click", () => {
  if (live.busy) return;
  if (live.recording) stopLive();
  else startLive();
});

function row(utterance) {
  let item = live.rows.get(utterance);
  if (!item) {
    item = el("li", "open");
    item.dataset.utterance = String(utterance);
    item.append(el("time"), el("span", "text"));
    $("lines").append(item);
    live.rows.set(utterance, item);
    $("live-copy").disabled = false;
    $("live-clear").disabled = false;
  }
  return item;
}

function scrollDown() {
  const box = $("transcript");
  box.scrollTop = box.scrollHeight;
}

function onLiveEvent(event) {
  switch (event.type) {
    case "partial": {
      const item = row(event.utterance);
      if (!item.classList.contains("open")) return;  // its final came first
      item.querySelector("time").textContent = clock(event.start);
      const text = item.querySelector(".text");
      const committed = el("span", "committed", event.committed);
      const tail = el("span", "tail", event.tail);
      text.replaceChildren(committed, event.committed && event.tail ? " " : "", tail);
      if (event.latency !== null) $("latency").textContent = `${event.latency.toFixed(2)} s`;
      scrollDown();
      break;
    }
    case "final": {
      const item = row(event.utterance);
      if (!event.text) {  // silence or noise that held no words
        item.remove();
        live.rows.delete(event.utterance);
        break;
      }
      item.className = "final";
      item.querySelector("time").textContent = `${clock(event.start)} – ${clock(event.end)}`;
      item.querySelector(".text").textContent = event.text;
      if (event.latency !== null) $("latency-final").textContent = `${event.latency.toFixed(2)} s`;
      scrollDown();
      break;
    }
    case "error":
      toast(event.message);
      break;
    case "closed":
      if (live.recording) {
        setRecording(false);
        teardownCapture();
        live.transcriber = null;
        setLiveState(event.reason ? `Connection closed: ${event.reason}` : "Connection lost.", true);
        if (event.code === 1008 && state.config && state.config.auth) loadConfig();
      }
      break;
    default:
      break;
  }
}

function showLevel(peak) {
  const db = 20 * Math.log10(Math.max(peak, 1e-4));
  const fraction = Math.min(1, Math.max(0, (db + 60) / 60));
  live.level = Math.max(fraction, live.level * 0.8);  // fast attack, slow release
  $("meter-mask").style.width = `${(100 * (1 - live.level)).toFixed(1)}%`;
  $("meter").setAttribute("aria-valuenow", String(Math.round(live.level * 60 - 60)));
}

$("live-copy").addEventListener("click", async () => {
  const text = [...$("lines").querySelectorAll("li.final .text")].map((node) => node.textContent).join("\n");
  try {
    await navigator.clipboard.writeText(text);
    toast("Copied");
  } catch {
    toast("The browser did not allow copying");
  }
});

$("live-clear").addEventListener("click", () => {
  $("lines").replaceChildren();
  live.rows.clear();
  $("live-empty").hidden = live.recording;
  $("live-copy").disabled = true;
  $("live-clear").disabled = true;
  $("latency").textContent = "–";
  $("latency-final").textContent = "–";
});

// ---------------------------------------------------------------- file

const upload = { file: null, raw: null, format: null, busy: false };
const EXTENSIONS = { text: "txt", json: "json", verbose_json: "json", srt: "srt", vtt: "vtt" };
const MEDIA_TYPES = { text: "text/plain", json: "application/json", verbose_json: "application/json", srt: "application/x-subrip", vtt: "text/vtt" };

function formatBytes(bytes) {  // with a no-break space: "25 MB" never wraps
  if (bytes >= 1024 * 1024) return `${(bytes / 1024 / 1024).toFixed(bytes >= 10 * 1024 * 1024 ? 0 : 1)}\u00a0MB`;
  if (bytes >= 1024) return `${Math.round(bytes / 1024)}\u00a0KB`;
  return `${bytes}\u00a0bytes`;
}

function uploadHint() {
  const { audio_formats: formats, max_upload_bytes: bytes } = state.config;
  return `${formats.replace(/, ([^,]+)$/, " or $1")}, up to ${formatBytes(bytes)}`;
}

function updateTranscribeButton() {
  $("transcribe").disabled = !upload.file || !state.config || upload.busy;
}

function chooseFile(file) {
  if (!file) return;
  upload.file = file;
  $("drop").classList.add("chosen");
  $("drop-title").textContent = file.name;
  $("drop-hint").textContent = `${formatBytes(file.size)} · choose another file to replace it`;
  $("file-error").hidden = true;
  $("result").hidden = true;  // the result shown was another file's
  updateTranscribeButton();
}

$("file-input").addEventListener("change", () => chooseFile($("file-input").files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", () => drop.classList.remove("over"));  // the window takes the file
// A file dropped anywhere on the page is taken (never opened by the browser in its place).
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => {
  event.preventDefault();
  if (event.dataTransfer && event.dataTransfer.files.length) {
    selectTab("file");
    chooseFile(event.dataTransfer.files[0]);
  }
});

function showFileError(error) {
  const box = $("file-error");
  const title = el("strong", "", error.status ? `The service refused the file (${error.status})` : "Upload failed");
  box.replaceChildren(title, el("span", "", error.message));
  box.hidden = false;
}

$("transcribe").addEventListener("click", async () => {
  if (!upload.file || upload.busy) return;
  upload.busy = true;
  const format = $("format").value;
  const started = performance.now();
  $("transcribe").textContent = "Transcribing…";
  const ticker = setInterval(() => {
    $("transcribe").textContent = `Transcribing… ${Math.round((performance.now() - started) / 1000)} s`;
  }, 1000);
  updateTranscribeButton();
  $("file-error").hidden = true;
  $("result").hidden = true;
  const form = new FormData();
  form.append("file", upload.file, upload.file.name);
  form.append("model", state.config.model);
  form.append("response_format", format);
  try {
    const response = await api("/v1/audio/transcriptions", { method: "POST", body: form });
    if (!response.ok) {
      const error = await errorOf(response);
      showFileError(error);
      if (response.status === 401) loadConfig();
      return;
    }
    upload.raw = await response.text();
    upload.format = format;
    showResult(format, upload.raw, (performance.now() - started) / 1000);
  } catch (error) {
    showFileError({ status: null, message: error.message });
  } finally {
    clearInterval(ticker);
    upload.busy = false;
    $("transcribe").textContent = "Transcribe";
    updateTranscribeButton();
  }
});

/** SRT or WebVTT text -> [{start, end, text}], times as written. */
function parseCues(raw) {
  const cues = [];
  for (const block of raw.replace(/\r/g, "").split(/\n{2,}/)) {
    const lines = block.split("\n");
    const at = lines.findIndex((line) => line.includes("-->"));
    if (at < 0) continue;
    const [start, end] = lines[at].split("-->").map((part) => part.trim().split(/\s+/)[0]);
    cues.push({ start, end, text: lines.slice(at + 1).join("\n").trim() });
  }
  return cues;
}

function cueList(cues) {
  $("cues").replaceChildren(...cues.map(({ start, end, text }) => {
    const item = el("li");
    item.append(el("time", "", `${start} → ${end}`), el("span", "text", text));
    return item;
  }));
}

function showResult(format, raw, seconds) {
  const raws = $("raw");
  raws.hidden = true;
  $("cues").replaceChildren();
  let summary = "";
  if (format === "srt" || format === "vtt") {
    const cues = parseCues(raw);
    cueList(cues);
    summary = `${cues.length} subtitle${cues.length === 1 ? "" : "s"}`;
  } else if (format === "verbose_json") {
    const body = JSON.parse(raw);
    cueList(body.segments.map((s) => ({ start: clock(s.start), end: clock(s.end), text: s.text.trim() })));
    summary = `${body.segments.length} segment${body.segments.length === 1 ? "" : "s"} · ${body.duration.toFixed(1)} s of audio · ${body.language}`;
  } else if (format === "json") {
    raws.textContent = JSON.stringify(JSON.parse(raw), null, 2);
    raws.hidden = false;
    summary = "JSON";
  } else {
    const item = el("li", "plain", raw.trim() || "(no words)");
    $("cues").replaceChildren(item);
    summary = "Transcript";
  }
  $("result-summary").textContent = `${summary} · transcribed in ${seconds.toFixed(2)} s`;
  $("result").hidden = false;
}

$("download").addEventListener("click", () => {
  if (upload.raw === null) return;
  const stem = upload.file.name.replace(/\.[^.]+$/, "") || "transcript";
  const blob = new Blob([upload.raw], { type: MEDIA_TYPES[upload.format] });
  const link = el("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${stem}.${EXTENSIONS[upload.format]}`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
});

loadConfig();
