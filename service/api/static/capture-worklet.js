// AudioWorklet: microphone samples (float, the AudioContext's rate) -> 16-bit little-endian PCM
// chunks of `chunkMs`, posted to the page with the chunk's peak and RMS for the level meter.
// Runs on the audio thread; the page only forwards the bytes to the transport.

class PcmCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const chunkMs = (options.processorOptions && options.processorOptions.chunkMs) || 50;
    this.size = Math.max(128, Math.round((sampleRate * chunkMs) / 1000));
    this.buffer = new Int16Array(this.size);
    this.filled = 0;
    this.peak = 0;
    this.squares = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    const frames = channels[0].length;
    const count = channels.length;
    for (let i = 0; i < frames; i++) {
      let sample = channels[0][i];
      if (count > 1) {  // downmix to mono
        for (let c = 1; c < count; c++) sample += channels[c][i];
        sample /= count;
      }
      if (sample > 1) sample = 1;
      else if (sample < -1) sample = -1;
      const magnitude = Math.abs(sample);
      if (magnitude > this.peak) this.peak = magnitude;
      this.squares += sample * sample;
      this.buffer[this.filled++] = sample < 0 ? sample * 0x8000 : sample * 0x7fff;
      if (this.filled === this.size) this.flush();
    }
    return true;
  }

  flush() {
    const pcm = this.buffer.buffer;
    this.port.postMessage(
      { pcm, peak: this.peak, rms: Math.sqrt(this.squares / this.filled) },
      [pcm],
    );
    this.buffer = new Int16Array(this.size);
    this.filled = 0;
    this.peak = 0;
    this.squares = 0;
  }
}

registerProcessor("pcm-capture", PcmCapture);
