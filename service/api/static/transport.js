// The live transport: the only code that knows the streaming protocol. It speaks the service's
// own websocket, /v1/audio/stream (see the README, "Streaming"), and hands the page
// protocol-free events, so moving to another protocol (e.g. OpenAI Realtime) changes this file
// alone:
//   {type: "partial", utterance, committed, tail, start, latency}
//   {type: "final", utterance, text, start, end, latency}
//   {type: "error", message}
//   {type: "closed", code, reason, clean}
// `latency` (seconds) is measured here: from the moment the audio an event covers was sent to
// the moment the event arrived.

export class LiveTranscriber {
  /**
   * @param {object} options
   * @param {number} options.sampleRate rate of the 16-bit mono PCM that `send` gets
   * @param {string|null} options.apiKey sent as `?api_key=` (browsers cannot set headers here)
   * @param {(event: object) => void} options.onEvent
   */
  constructor({ sampleRate, apiKey, onEvent }) {
    this.sampleRate = sampleRate;
    this.apiKey = apiKey;
    this.onEvent = onEvent;
    this.socket = null;
    this.samplesSent = 0;
    this.marks = [];  // [seconds of audio sent so far, performance.now() when sent]
    this.silenceSeconds = 0.6;
    this.endSentAt = null;
    this.finished = null;
  }

  /** Seconds of audio sent so far. */
  get sentSeconds() {
    return this.samplesSent / this.sampleRate;
  }

  /** Connect; resolves once the server has accepted the session, rejects with its reason. */
  open() {
    const query = new URLSearchParams({ sample_rate: String(this.sampleRate), encoding: "pcm_s16le" });
    if (this.apiKey) query.set("api_key", this.apiKey);
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}/v1/audio/stream?${query}`);
    this.socket = socket;
    return new Promise((resolve, reject) => {
      let accepted = false;
      let done = null;
      this.finished = new Promise((r) => { done = r; });
      socket.onmessage = (message) => {
        let event;
        try {
          event = JSON.parse(message.data);
        } catch {
          return;
        }
        if (!accepted) {
          if (event.type === "session.created") {
            accepted = true;
            this.silenceSeconds = (event.config?.silence_duration_ms ?? 600) / 1000;
            resolve();
          } else if (event.type === "error") {
            reject(new Error(event.error?.message ?? "the server refused the session"));
          }
          return;
        }
        this.dispatch(event);
      };
      socket.onclose = (close) => {
        if (!accepted) {
          reject(new Error(close.reason || "could not open the live connection"));
        } else {
          this.onEvent({ type: "closed", code: close.code, reason: close.reason, clean: close.code === 1000 });
        }
        done();
      };
    });
  }

  dispatch(event) {
    const now = performance.now();
    switch (event.type) {
      case "transcript.partial":
        this.onEvent({
          type: "partial",
          utterance: event.utterance,
          committed: event.committed,
          tail: event.tail,
          start: event.start,
          latency: this.since(event.audio_end, now),
        });
        break;
      case "transcript.final": {
        // A pause-ended utterance is only known to have ended once the pause was heard.
        const heardAt = event.reason === "silence" ? event.end + this.silenceSeconds : event.end;
        const latency = event.reason === "end_of_stream" && this.endSentAt !== null
          ? (now - this.endSentAt) / 1000
          : this.since(heardAt, now);
        this.onEvent({
          type: "final", utterance: event.utterance, text: event.text, start: event.start, end: event.end, latency,
        });
        break;
      }
      case "error":
        this.onEvent({ type: "error", message: event.error?.message ?? "error" });
        break;
      default:
        break;  // session.ended: the close follows
    }
  }

  /** Seconds from when the audio up to `seconds` was sent until `now`, or null if unknown. */
  since(seconds, now) {
    const mark = this.marks.find(([sent]) => sent >= seconds - 1e-6);
    return mark ? Math.max(0, (now - mark[1]) / 1000) : null;
  }

  /** Send one chunk of 16-bit little-endian mono PCM (an ArrayBuffer). */
  send(pcm) {
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) return;
    this.socket.send(pcm);
    this.samplesSent += pcm.byteLength / 2;
    this.marks.push([this.sentSeconds, performance.now()]);
    if (this.marks.length > 2000) this.marks.splice(0, this.marks.length - 2000);
  }

  /** End of audio: the open utterance becomes the last final; resolves once the server closed
   * (or, if it has not within `waitSeconds`, after closing the socket from this side). */
  async finish(waitSeconds = 30) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.endSentAt = performance.now();
      this.socket.send(JSON.stringify({ type: "end" }));
    }
    let timer = null;
    const late = new Promise((resolve) => { timer = setTimeout(resolve, waitSeconds * 1000); });
    await Promise.race([this.finished, late]);
    clearTimeout(timer);
    this.close();
  }

  /** Drop the session at once (its pending work is cancelled by the server). */
  close() {
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) this.socket.close(1000, "closed by the page");
  }
}
