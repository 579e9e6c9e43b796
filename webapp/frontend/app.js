// MuseTalk chat page: the avatar live over WebRTC (idle until it speaks), each reply sentence spoken as soon as
// the LLM completes it, a new message interrupting the avatar. Without WebRTC it falls back to clip mode: poll
// the reply job and play the session video. Plain browser JavaScript, no build step, no external resources.
(() => {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const video = $("avatar");
  const placeholder = $("placeholder");
  const overlay = $("unmute");
  const statusText = $("status");
  const progress = $("progress");
  const list = $("messages");
  const form = $("composer");
  const input = $("message");
  const sendBtn = $("send");
  const resetBtn = $("reset");
  const engine = $("engine");

  const STORE_KEY = "musetalk.chat.v1";
  const HISTORY_MESSAGES = 16; // earlier messages sent back for context (the server trims further)
  const MAX_POLL_FAILURES = 20; // consecutive network failures before a job is given up

  const ICON_MUTED = '<svg aria-hidden="true" viewBox="0 0 24 24" width="20" height="20"><path fill="currentColor" '
    + 'd="M3 9v6h4l5 5V4L7 9H3z"/><path d="M16 9l5 6M21 9l-5 6" stroke="currentColor" stroke-width="2" '
    + 'stroke-linecap="round"/></svg>';
  const ICON_PLAY = '<svg aria-hidden="true" viewBox="0 0 24 24" width="20" height="20">'
    + '<path fill="currentColor" d="M7 4v16l13-8z"/></svg>';

  let pollMs = 500;
  let engineNote = "";
  let mode = "connecting"; // "live": the WebRTC stream | "clips": the session video (fallback)
  const LIVE_CONNECT_MS = 10000; // ICE + DTLS must be up within this, else clip mode
  const LIVE_RECONNECT_TRIES = 5; // a lost stream is connected again this many times before clip mode
  const LIVE_RECONNECT_WAIT_MS = 2000; // between tries (a cluster moves a session within seconds)
  // The live stream: its peer connection, what is on air (an utterance id), and which sentence each id is.
  const live = { pc: null, onAir: null, jobId: null, bubble: null, sentences: new Map(), jobDone: false };

  const state = {
    sessionId: "",
    turns: [], // [{role: "user"|"assistant", content}] of finished exchanges, for the LLM's context
    log: [], // [{kind: "user"|"bot"|"error", text}] what the chat shows, restored on reload
    busy: false,
    jobId: null,
  };

  // What the <video> holds: the session file after `count` clips of reply `jobId`.
  const player = { jobId: null, count: 0, version: null, pending: null, loadToken: 0, saved: null };

  // ---------------------------------------------------------------- storage

  function newSessionId() {
    const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789";
    const bytes = new Uint8Array(10);
    crypto.getRandomValues(bytes);
    return "web-" + Array.from(bytes, (b) => alphabet[b % alphabet.length]).join("");
  }

  function save() {
    try {
      sessionStorage.setItem(STORE_KEY, JSON.stringify({
        sessionId: state.sessionId, turns: state.turns, log: state.log, video: player.saved,
      }));
    } catch (_) {
      // Storage full or disabled: the page still works, it just forgets on reload.
    }
  }

  function restore() {
    let saved = null;
    try {
      saved = JSON.parse(sessionStorage.getItem(STORE_KEY) || "null");
    } catch (_) {
      saved = null;
    }
    state.sessionId = (saved && /^[A-Za-z0-9_-]{1,64}$/.test(saved.sessionId)) ? saved.sessionId : newSessionId();
    if (!saved) return;
    state.turns = Array.isArray(saved.turns) ? saved.turns : [];
    for (const entry of Array.isArray(saved.log) ? saved.log : []) {
      if (!entry || !entry.text) continue; // a reply that was still pending when the page was left
      const li = addEntry(entry.kind, entry.text);
      if (entry.kind === "bot") li.dataset.status = "done";
    }
    if (saved.video && saved.video.src) player.saved = saved.video; // loaded if the page falls back to clips
  }

  // ---------------------------------------------------------------- chat log

  function addEntry(kind, text) {
    const li = document.createElement("li");
    li.className = `msg msg-${kind}`;
    if (kind === "bot") {
      const who = document.createElement("span");
      who.className = "who";
      who.textContent = "Avatar";
      const body = document.createElement("span");
      body.className = "text";
      body.textContent = text;
      li.append(who, body);
    } else {
      li.textContent = text;
    }
    if (kind === "error") li.setAttribute("role", "alert");
    list.append(li);
    list.scrollTop = list.scrollHeight;
    state.log.push({ kind, text });
    li.dataset.logIndex = String(state.log.length - 1);
    return li;
  }

  function setBotText(li, text) {
    li.querySelector(".text").textContent = text;
    list.scrollTop = list.scrollHeight;
  }

  function showError(bubble, message) {
    const spoken = bubble && bubble.querySelector(".text").textContent.trim();
    if (bubble && !spoken) {
      const index = Number(bubble.dataset.logIndex);
      bubble.remove();
      if (!Number.isNaN(index)) state.log.splice(index, 1);
    } else if (bubble) {
      bubble.dataset.status = "error";
    }
    addEntry("error", message);
    setStatus(message, null);
    save();
  }

  // ---------------------------------------------------------------- status line

  function setStatus(text, percent) {
    statusText.textContent = text;
    if (percent === null || percent === undefined) {
      progress.hidden = true;
    } else {
      progress.hidden = false;
      progress.value = Math.max(0, Math.min(100, percent));
    }
  }

  function setBusy(busy) {
    state.busy = busy;
    document.body.dataset.state = busy ? "busy" : "idle";
    sendBtn.disabled = busy;
    resetBtn.disabled = busy;
    list.setAttribute("aria-busy", String(busy));
  }

  // ---------------------------------------------------------------- video

  function withVersion(url, version) {
    // Cache-buster: each append replaces the session file under the same URL.
    const u = new URL(url, location.href);
    u.searchParams.set("v", version);
    return u.href;
  }

  function showOverlay(mode) {
    overlay.dataset.mode = mode;
    // Inline SVG icons: emoji fonts are not everywhere (and nothing is fetched from the internet).
    overlay.innerHTML = mode === "unmute"
      ? `${ICON_MUTED} Tap to unmute`
      : `${ICON_PLAY} Tap to play`;
    overlay.setAttribute("aria-label", mode === "unmute" ? "Tap to unmute the avatar" : "Tap to play the avatar");
    overlay.hidden = false;
  }

  function hideOverlay() {
    overlay.hidden = true;
    delete overlay.dataset.mode;
  }

  async function startPlayback() {
    try {
      await video.play();
      if (!video.muted && overlay.dataset.mode === "unmute") hideOverlay();
      if (overlay.dataset.mode === "play") hideOverlay();
    } catch (err) {
      if (err && err.name === "AbortError") return; // a newer source replaced this one
      if (err && err.name === "NotAllowedError" && !video.muted) {
        // Autoplay policy: sound needs a user gesture first. Play muted and offer to unmute.
        video.muted = true;
        try {
          await video.play();
          showOverlay("unmute");
          return;
        } catch (err2) {
          if (err2 && err2.name === "AbortError") return;
        }
      }
      showOverlay("play");
    }
  }

  function load(next, seekS, autoplay) {
    const token = ++player.loadToken;
    player.jobId = next.jobId;
    player.count = next.count;
    player.version = next.version;
    player.pending = null;
    player.saved = { src: next.src, version: next.version, jobId: next.jobId, count: next.count, startS: seekS };
    save();
    placeholder.hidden = true;
    video.dataset.version = next.version;
    video.dataset.seek = String(seekS);
    video.addEventListener("loadedmetadata", () => {
      if (token !== player.loadToken) return;
      const end = Number.isFinite(video.duration) ? video.duration : seekS;
      video.currentTime = Math.max(0, Math.min(seekS, end - 0.04));
      if (autoplay) startPlayback();
    }, { once: true });
    video.src = next.src;
  }

  // A status carries the sentences spoken so far; each made a newer session file. Play from the reply's first
  // clip, and let a playing clip finish before switching to the newer file (switching reloads the video).
  function offer(job) {
    const sentences = job.sentences || [];
    if (!sentences.length) return;
    const count = sentences.length;
    const latest = sentences[count - 1];
    const version = `${job.job_id}.${count}`;
    const next = { src: withVersion(latest.video_url, version), version, jobId: job.job_id, count };
    if (player.jobId !== job.job_id) {
      load(next, sentences[0].clip_start_s, true);
      return;
    }
    if (count <= player.count || (player.pending && player.pending.count >= count)) return;
    const resumeS = sentences[player.count].clip_start_s; // first clip the loaded file lacks
    if (!video.paused && !video.ended) {
      player.pending = { ...next, resumeS };
    } else if (video.ended) {
      load(next, resumeS, true);
    } else {
      load(next, video.currentTime, false); // paused by the user: keep their place
    }
  }

  video.addEventListener("ended", () => {
    const next = player.pending;
    if (next) load(next, next.resumeS, true);
  });
  video.addEventListener("volumechange", () => {
    if (!video.muted && overlay.dataset.mode === "unmute") hideOverlay();
  });
  video.addEventListener("play", () => {
    if (overlay.dataset.mode === "play") hideOverlay();
  });
  video.addEventListener("error", () => {
    if (!video.getAttribute("src")) return;
    const detail = video.error && video.error.message ? ` (${video.error.message})` : "";
    setStatus(`The video could not be loaded${detail}.`, null);
  });
  overlay.addEventListener("click", () => {
    video.muted = false;
    hideOverlay();
    if (video.paused) startPlayback();
  });

  // ---------------------------------------------------------------- jobs

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function describeError(status, body) {
    const detail = body && body.detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) return detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
    return `the server answered HTTP ${status}`;
  }

  class Fatal extends Error {}

  async function fetchStatus(jobId) {
    let response;
    try {
      // The session id routes the poll to the replica that runs the job when the server is a cluster.
      const session = encodeURIComponent(state.sessionId);
      response = await fetch(`status/${encodeURIComponent(jobId)}?session_id=${session}`, { cache: "no-store" });
    } catch (_) {
      return null; // network hiccup: try again
    }
    if (response.status === 404) {
      throw new Fatal("The server no longer knows this reply (it expired or the server restarted).");
    }
    if (!response.ok) return null;
    return response.json();
  }

  function describeProgress(job) {
    if (job.status === "queued") return "Waiting for the previous reply to finish…";
    if (job.stage === "thinking") return "Thinking…";
    if (job.stage === "speaking") return `${job.detail} — rendering the avatar…`;
    return job.detail || job.status;
  }

  async function poll(jobId, bubble, userText) {
    let failures = 0;
    while (state.jobId === jobId) {
      let job;
      try {
        job = await fetchStatus(jobId);
      } catch (err) {
        showError(bubble, err.message);
        return;
      }
      if (job === null) {
        failures += 1;
        if (failures > MAX_POLL_FAILURES) {
          showError(bubble, "Lost the connection to the server while waiting for the reply.");
          return;
        }
        setStatus("Connection problem, retrying…", null);
        await sleep(pollMs);
        continue;
      }
      failures = 0;
      const text = job.reply || job.reply_so_far || "";
      if (text) setBotText(bubble, text);
      offer(job);
      if (job.status === "done") {
        bubble.dataset.status = "done";
        bubble.dataset.version = `${job.job_id}.${job.sentences.length}`;
        state.log[Number(bubble.dataset.logIndex)].text = job.reply;
        state.turns.push({ role: "user", content: userText }, { role: "assistant", content: job.reply });
        setStatus(`Reply ready (${job.sentences.length} sentence${job.sentences.length === 1 ? "" : "s"}).`, null);
        save();
        return;
      }
      if (job.status === "error") {
        showError(bubble, `Sorry, that failed: ${job.error}`);
        return;
      }
      setStatus(describeProgress(job), Math.round((job.progress || 0) * 100));
      await sleep(pollMs);
    }
  }

  async function send(text) {
    if (state.busy) return;
    setBusy(true);
    addEntry("user", text);
    input.value = "";
    autosize();
    const bubble = addEntry("bot", "");
    bubble.dataset.status = "pending";
    setStatus("Sending…", 2);
    try {
      const response = await fetch("chat", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({
          message: text, session_id: state.sessionId, history: state.turns.slice(-HISTORY_MESSAGES),
        }),
      });
      const body = await response.json().catch(() => ({}));
      if (!response.ok) {
        showError(bubble, `Could not send: ${describeError(response.status, body)}`);
        return;
      }
      state.jobId = body.job_id;
      bubble.dataset.jobId = body.job_id;
      await poll(body.job_id, bubble, text);
    } catch (err) {
      showError(bubble, `Could not reach the server: ${err.message}`);
    } finally {
      state.jobId = null;
      setBusy(false);
    }
  }

  async function reset() {
    if (state.busy) return;
    resetBtn.disabled = true;
    try {
      if (mode === "live") {
        live.jobId = null;
        await fetch(`sessions/${encodeURIComponent(state.sessionId)}/interrupt`, { method: "POST" });
      }
      const response = await fetch(`reset?session_id=${encodeURIComponent(state.sessionId)}`, { method: "POST" });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        setStatus(`Reset failed: ${describeError(response.status, body)}`, null);
        return;
      }
    } catch (err) {
      setStatus(`Reset failed: ${err.message}`, null);
      return;
    } finally {
      resetBtn.disabled = state.busy;
    }
    state.turns = [];
    state.log = [];
    list.replaceChildren();
    player.loadToken += 1;
    Object.assign(player, { jobId: null, count: 0, version: null, pending: null, saved: null });
    if (mode !== "live") { // the live stream goes on (idle)
      video.pause();
      video.removeAttribute("src");
      delete video.dataset.version;
      video.load();
      hideOverlay();
      placeholder.hidden = false;
    }
    save();
    setStatus(`Conversation cleared. ${engineNote}`.trim(), null);
    input.focus();
  }

  // ---------------------------------------------------------------- input

  function autosize() {
    input.style.height = "auto";
    input.style.height = `${Math.min(input.scrollHeight, 160)}px`;
  }

  input.addEventListener("input", autosize);
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    if (mode === "live") {
      sendLive(text);
      return;
    }
    if (state.busy) return;
    send(text);
  });
  resetBtn.addEventListener("click", reset);

  // ---------------------------------------------------------------- live stream (WebRTC)

  function waitFor(target, event, ready, timeoutMs, what) {
    return new Promise((resolve, reject) => {
      if (ready()) { resolve(); return; }
      const timer = setTimeout(() => { target.removeEventListener(event, check); reject(new Error(`${what} timed out`)); },
        timeoutMs);
      function check() {
        if (!ready()) return;
        clearTimeout(timer);
        target.removeEventListener(event, check);
        resolve();
      }
      target.addEventListener(event, check);
    });
  }

  async function connectLive() {
    if (!("RTCPeerConnection" in window)) throw new Error("this browser has no WebRTC");
    const pc = new RTCPeerConnection();
    live.pc = pc;
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.addTransceiver("audio", { direction: "recvonly" });
    const events = pc.createDataChannel("events");
    events.onmessage = (e) => onLiveEvent(JSON.parse(e.data));
    const stream = new MediaStream();
    pc.ontrack = (e) => {
      stream.addTrack(e.track);
      if (video.srcObject !== stream) video.srcObject = stream;
    };
    await pc.setLocalDescription(await pc.createOffer());
    // The server takes the offer with its candidates inside (no trickle).
    await waitFor(pc, "icegatheringstatechange", () => pc.iceGatheringState === "complete", 5000, "ICE gathering")
      .catch(() => {}); // send what was gathered so far
    const response = await fetch(`sessions/${encodeURIComponent(state.sessionId)}/offer`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(describeError(response.status, body));
    await pc.setRemoteDescription(body);
    await waitFor(pc, "connectionstatechange", () => pc.connectionState === "connected", LIVE_CONNECT_MS,
      "connecting");
    pc.addEventListener("connectionstatechange", () => {
      if (mode === "live" && live.pc === pc && (pc.connectionState === "failed" || pc.connectionState === "closed")) {
        reconnectLive();
      }
    });
    mode = "live";
    document.body.dataset.mode = "live";
    placeholder.hidden = true;
    video.controls = false;
    startPlayback();
  }

  // A lost stream is connected again (the server restarted, or on a cluster the session moved to another
  // replica); after LIVE_RECONNECT_TRIES failed tries the page falls back to clips.
  async function reconnectLive() {
    for (let attempt = 1; attempt <= LIVE_RECONNECT_TRIES && mode === "live"; attempt++) {
      if (live.pc) live.pc.close();
      live.pc = null;
      setStatus(`The live stream was lost; reconnecting (try ${attempt} of ${LIVE_RECONNECT_TRIES})…`, null);
      await new Promise((resolve) => setTimeout(resolve, LIVE_RECONNECT_WAIT_MS));
      try {
        await connectLive();
        setStatus(`Ready. ${engineNote}`.trim(), null);
        return;
      } catch (_) {
        // the next try
      }
    }
    if (mode === "live") toClips("The live stream was lost");
  }

  function toClips(reason) {
    const saved = player.saved;
    if (saved && saved.src && !video.getAttribute("src")) {
      load({ src: saved.src, version: saved.version, jobId: saved.jobId, count: saved.count }, saved.startS || 0, false);
    }
    if (live.pc) live.pc.close();
    live.pc = null;
    mode = "clips";
    document.body.dataset.mode = "clips";
    video.srcObject = null;
    video.controls = true;
    placeholder.textContent = "Send a message and the avatar will say the reply.";
    placeholder.hidden = Boolean(video.getAttribute("src"));
    setStatus(`${reason}: replies play as clips of the session video. ${engineNote}`.trim(), null);
  }

  function describeOnAir() {
    const sentence = live.sentences.get(live.onAir);
    if (!sentence) return "Speaking…";
    const of = sentence.total ? ` of ${sentence.total}` : "";
    return `Speaking sentence ${sentence.index}${of}`;
  }

  // The server says what is on air: the status names the sentence being heard, not the one rendering.
  function onLiveEvent(event) {
    if (event.type === "speaking") {
      live.onAir = event.utterance;
      document.body.dataset.onAir = String(event.utterance);
      setStatus(describeOnAir(), null);
    } else if (event.type === "idle") {
      live.onAir = null;
      delete document.body.dataset.onAir;
      if (live.jobId === null) setStatus(`Ready. ${engineNote}`.trim(), null);
      else setStatus(live.jobDone ? "Reply finished." : "Thinking…", null);
    }
  }

  async function pollLive(jobId, bubble, userText) {
    let failures = 0;
    while (live.jobId === jobId) {
      let job;
      try {
        job = await fetchStatus(jobId);
      } catch (err) {
        if (live.jobId === jobId) showError(bubble, err.message);
        return;
      }
      if (live.jobId !== jobId) return; // a newer message took over
      if (job === null) {
        failures += 1;
        if (failures > MAX_POLL_FAILURES) {
          showError(bubble, "Lost the connection to the server while waiting for the reply.");
          live.jobId = null;
          return;
        }
        await sleep(pollMs);
        continue;
      }
      failures = 0;
      const text = job.reply || job.reply_so_far || "";
      if (text) setBotText(bubble, text);
      for (const s of job.sentences || []) {
        live.sentences.set(s.utterance, { index: s.index, total: job.sentences_total });
      }
      if (live.onAir !== null) setStatus(describeOnAir(), null);
      if (job.status === "done") {
        const interrupted = job.detail === "Interrupted";
        bubble.dataset.status = interrupted ? "interrupted" : "done";
        state.log[Number(bubble.dataset.logIndex)].text = job.reply || text;
        state.turns.push({ role: "user", content: userText }, { role: "assistant", content: job.reply || text });
        live.jobId = null;
        live.bubble = null;
        if (live.onAir === null) setStatus(interrupted ? "Interrupted." : "Reply finished.", null);
        save();
        return;
      }
      if (job.status === "error") {
        live.jobId = null;
        live.bubble = null;
        showError(bubble, `Sorry, that failed: ${job.error}`);
        return;
      }
      if (live.onAir === null) setStatus(job.stage === "thinking" ? "Thinking…" : "Rendering the first sentence…", null);
      await sleep(pollMs);
    }
  }

  async function sendLive(text) {
    // A new message while the avatar talks (or a reply is still coming) interrupts it.
    const interrupt = live.jobId !== null || live.onAir !== null;
    if (live.bubble) {
      live.bubble.dataset.status = "interrupted";
      const said = live.bubble.querySelector(".text").textContent.trim();
      if (said) state.turns.push({ role: "user", content: live.userText }, { role: "assistant", content: said });
    }
    live.jobId = null;
    addEntry("user", text);
    input.value = "";
    autosize();
    const bubble = addEntry("bot", "");
    bubble.dataset.status = "pending";
    setStatus(interrupt ? "Interrupting…" : "Sending…", null);
    try {
      const response = await fetch("chat", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({
          message: text, session_id: state.sessionId, history: state.turns.slice(-HISTORY_MESSAGES),
          live: true, interrupt,
        }),
      });
      const body = await response.json().catch(() => ({}));
      if (!response.ok) {
        showError(bubble, `Could not send: ${describeError(response.status, body)}`);
        return;
      }
      live.jobId = body.job_id;
      live.jobDone = false;
      live.bubble = bubble;
      live.userText = text;
      bubble.dataset.jobId = body.job_id;
      await pollLive(body.job_id, bubble, text);
    } catch (err) {
      showError(bubble, `Could not reach the server: ${err.message}`);
    }
  }

  // ---------------------------------------------------------------- start

  async function loadInfo() {
    try {
      const response = await fetch("chat/info", { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const info = await response.json();
      pollMs = info.poll_interval_ms || pollMs;
      if (info.max_message_chars) input.maxLength = info.max_message_chars;
      const builtin = Boolean(info.llm && info.llm.builtin);
      engine.dataset.builtin = String(builtin);
      engine.textContent = builtin ? "Built-in responder (offline)" : `LLM: ${info.llm.label}`;
      engine.title = builtin
        ? "Replies come from the simple built-in responder, which needs no network. Configure an "
          + "OpenAI-compatible LLM (webapp.llm.engine: openai) for real conversation."
        : `Replies come from ${info.llm.label}.`;
      engineNote = builtin ? "Replies come from the built-in responder (offline, simple answers)." : "";
      infoLive = Boolean(info.live);
    } catch (err) {
      engine.textContent = "LLM: unknown";
      engineNote = "";
    }
    if (!state.busy) setStatus(`Ready. ${engineNote}`.trim(), null);
    return Boolean(infoLive);
  }

  let infoLive = false;

  async function start() {
    restore();
    const canLive = await loadInfo();
    if (new URLSearchParams(location.search).has("clips")) {
      toClips("Clip mode (?clips)");
      return;
    }
    if (!canLive) {
      toClips("This server has no live stream for the chat");
      return;
    }
    try {
      await connectLive();
      setStatus(`Ready. ${engineNote}`.trim(), null);
    } catch (err) {
      toClips(`The live stream could not connect (${err.message})`);
    }
  }

  start();
})();
