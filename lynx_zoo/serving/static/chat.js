// The chat page of `python -m lynx_zoo serve`: plain JavaScript over the server's own OpenAI endpoint.
// A conversation is about at most one image or video (the model reads one); it travels as a data URL in the
// first user message, and every request sends the whole conversation.
"use strict";

const state = {
  model: "",
  media: null,        // {kind: "image" | "video", url: "data:...", name}
  history: [],        // OpenAI messages of this conversation
  busy: false,
};

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function scrollDown() {
  const messages = $("messages");
  messages.scrollTop = messages.scrollHeight;
}

function addMessage(role, text) {
  const node = element("div", `message ${role}`, text);
  $("messages").appendChild(node);
  scrollDown();
  return node;
}

function notice(text) {
  $("messages").appendChild(element("div", "notice", text));
  scrollDown();
}

function mediaElement(media, className) {
  const node = element(media.kind === "video" ? "video" : "img", className);
  node.src = media.url;
  if (media.kind === "video") {
    node.muted = true;
    node.loop = true;
    node.autoplay = true;
  } else {
    node.alt = media.name;
  }
  return node;
}

function showPreview() {
  const preview = $("preview");
  preview.replaceChildren();
  preview.classList.toggle("empty", !state.media);
  if (state.media) preview.appendChild(mediaElement(state.media));
  else preview.textContent = "no image: questions are answered from text alone";
}

function newConversation(message) {
  state.history = [];
  $("messages").replaceChildren();
  if (message) notice(message);
}

function setMedia(media) {
  state.media = media;
  showPreview();
  newConversation(media ? `new conversation about ${media.name}` : "new conversation");
}

// the server's API key, asked for once (when the server answers 401) and kept in this browser
const KEY_STORE = "lynx_zoo_api_key";

function askForKey(message) {
  return new Promise((resolve) => {
    const form = $("key-form");
    $("key-message").textContent = message;
    form.hidden = false;
    $("api-key").focus();
    form.onsubmit = (event) => {
      event.preventDefault();
      const key = $("api-key").value.trim();
      if (!key) return;
      form.hidden = true;
      $("api-key").value = "";
      resolve(key);
    };
  });
}

// fetch with the API key; on a 401 the page asks for the key and tries again
async function api(url, options = {}) {
  for (;;) {
    const key = localStorage.getItem(KEY_STORE);
    const headers = {...(options.headers || {}), ...(key ? {Authorization: `Bearer ${key}`} : {})};
    const response = await fetch(url, {...options, headers});
    if (response.status !== 401) return response;
    const body = await response.json();
    localStorage.setItem(KEY_STORE, await askForKey(`${body.error.message} Enter this server's API key.`));
  }
}

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function pickExample(example, button) {
  const blob = await (await api(example.url)).blob();
  document.querySelectorAll("#examples button").forEach((b) => b.classList.remove("selected"));
  button.classList.add("selected");
  $("file-input").value = "";
  setMedia({kind: "image", url: await readAsDataURL(blob), name: example.name});
  const suggestions = $("suggestions");
  suggestions.replaceChildren();
  for (const question of example.questions) {
    const chip = element("button", "", question);
    chip.type = "button";
    chip.addEventListener("click", () => { $("question").value = question; $("question").focus(); });
    suggestions.appendChild(chip);
  }
}

async function upload(event) {
  const file = event.target.files[0];
  if (!file) return;
  const kind = file.type.startsWith("video/") ? "video" : "image";
  document.querySelectorAll("#examples button").forEach((b) => b.classList.remove("selected"));
  $("suggestions").replaceChildren();
  setMedia({kind, url: await readAsDataURL(file), name: file.name});
}

function userContent(text) {
  if (state.history.length > 0 || !state.media) return text;
  const key = state.media.kind === "video" ? "video_url" : "image_url";
  return [{type: key, [key]: {url: state.media.url}}, {type: "text", text}];
}

function generationFields() {
  const fields = {};
  const maxTokens = $("max-tokens").value;
  const temperature = $("temperature").value;
  if (maxTokens !== "") fields.max_tokens = Number(maxTokens);
  if (temperature !== "") fields.temperature = Number(temperature);
  return fields;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch (err) {
    return `${response.status} ${response.statusText}`;
  }
}

// Reads server-sent events (`data: {...}` lines) and calls onData with each parsed payload.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function ask(question) {
  const firstTurn = state.history.length === 0;
  const bubble = addMessage("user", "");
  if (firstTurn && state.media) bubble.appendChild(mediaElement(state.media, "thumb"));
  bubble.appendChild(document.createTextNode(question));
  const messages = [...state.history, {role: "user", content: userContent(question)}];

  const answer = addMessage("assistant", "");
  const answerText = answer.appendChild(element("span", "text"));
  answer.dataset.state = "streaming";
  let text = "";
  let finish = null;
  const response = await api("/v1/chat/completions", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({model: state.model, messages, stream: true, ...generationFields()}),
  });
  if (!response.ok) {
    answer.remove();
    addMessage("error", await errorMessage(response));
    return;
  }
  let failure = null;
  await readEvents(response, (chunk) => {
    if (chunk.error) { failure = chunk.error.message; return; }
    for (const choice of chunk.choices) {
      if (choice.delta && choice.delta.content) {
        text += choice.delta.content;
        answerText.textContent = text;
        scrollDown();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  });
  if (failure) {
    answer.remove();
    addMessage("error", failure);
    return;
  }
  answer.dataset.state = "done";
  if (finish === "length") answer.appendChild(element("span", "meta", "(stopped at max tokens)"));
  state.history = [...messages, {role: "assistant", content: text}];
}

async function submit(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.busy) return;
  state.busy = true;
  $("send").disabled = true;
  $("question").value = "";
  try {
    await ask(question);
  } catch (err) {
    addMessage("error", `request failed: ${err}`);
  } finally {
    state.busy = false;
    $("send").disabled = false;
    $("question").focus();
  }
}

async function start() {
  const info = await (await api("/info")).json();
  state.model = info.model;
  $("model-name").textContent = `${info.model} (${info.fusion})`;
  document.title = `${info.model}: lynx_zoo chat`;
  const defaults = Object.entries(info.generation).map(([k, v]) => `${k}=${v}`).join(", ");
  $("defaults").textContent = `variant defaults: ${defaults}`;
  if (info.video) {
    $("file-input").accept += ",video/*";
  } else {
    document.querySelector(".upload").firstChild.textContent = "Upload an image";
  }
  for (const example of info.examples) {
    const button = element("button");
    button.type = "button";
    button.dataset.name = example.name;
    button.title = example.name;
    const image = element("img");
    api(example.url).then((r) => r.blob()).then((blob) => { image.src = URL.createObjectURL(blob); });
    image.alt = example.name;
    button.appendChild(image);
    button.addEventListener("click", () => pickExample(example, button));
    $("examples").appendChild(button);
  }
  $("file-input").addEventListener("change", upload);
  $("ask").addEventListener("submit", submit);
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) submit(event);
  });
  $("new-chat").addEventListener("click", () => newConversation("new conversation"));
  document.body.dataset.ready = "true";
}

start();
