// The chat playground (templates/playground.html). Hand-written, no dependencies. The answer is
// attacker-controlled text (upstream's): it goes into the page through textContent only.
"use strict";

(function () {
  const form = document.getElementById("pg-form");
  if (!form) return;
  const turns = document.getElementById("pg-turns");
  const status = document.getElementById("pg-status");
  const send = document.getElementById("pg-send");
  const csrf = document.querySelector("main").dataset.csrf || "";

  function element(tag, className, text) {
    const el = document.createElement(tag);
    if (className) el.className = className;
    if (text !== undefined && text !== null) el.textContent = text;
    return el;
  }

  // Mirrors _playground_turn.html's turn().
  function newTurn(prompt) {
    const li = element("li", "pg-turn");
    const user = element("div", "pg-user");
    user.append(element("span", "pg-role", "You"), element("div", "pg-text", prompt));
    const assistant = element("div", "pg-assistant");
    const answer = element("div", "pg-text pg-answer");
    const meta = element("p", "pg-meta meta", "waiting for the answer…");
    assistant.append(element("span", "pg-role", "Assistant"), answer, meta);
    li.append(user, assistant);
    turns.append(li);
    li.scrollIntoView({ block: "nearest" });
    return { li, assistant, answer, meta };
  }

  function showError(turn, message) {
    const p = element("p", "pg-error error", message);
    p.setAttribute("role", "alert");
    turn.assistant.insertBefore(p, turn.meta);
  }

  // Mirrors _playground_turn.html's turn_meta().
  function showMeta(meta, t) {
    meta.replaceChildren();
    const parts = [];
    if (t.flow_row_id) {
      const link = element("a", "pg-flow", "flow #" + t.flow_row_id);
      link.href = "/flows/" + t.flow_row_id;
      parts.push(link);
    } else if (t.flow_id) {
      parts.push(element("span", "pg-flow-pending", "flow not stored yet"));
    }
    if (t.status !== null && t.status !== undefined) {
      parts.push(element("span", "status s" + Math.floor(t.status / 100) + "xx", String(t.status)));
    }
    if (t.total_tokens !== null && t.total_tokens !== undefined) {
      parts.push(element("span", "pg-tokens", (t.prompt_tokens || 0) + " in, " + (t.completion_tokens || 0) + " out tokens"));
    }
    if (t.cost !== null && t.cost !== undefined) parts.push(element("span", "pg-cost", "$" + t.cost.toFixed(6)));
    if (t.first_byte_ms !== null && t.first_byte_ms !== undefined) {
      parts.push(element("span", "pg-first-byte", "first byte " + Math.round(t.first_byte_ms) + " ms"));
    }
    if (t.duration_ms !== null && t.duration_ms !== undefined) {
      parts.push(element("span", "pg-total", "total " + Math.round(t.duration_ms) + " ms"));
    }
    parts.forEach((part, i) => {
      if (i) meta.append(" · ");
      meta.append(part);
    });
  }

  // The flow's record is written by the proxy shortly after the answer ends: asked for until it is there.
  async function followFlow(conversation, flowId, meta) {
    for (let i = 0; i < 40; i++) {
      const response = await fetch("/api/playground/conversations/" + encodeURIComponent(conversation), {
        headers: { accept: "application/json" },
      });
      if (!response.ok) return;
      const found = (await response.json()).turns.filter((t) => t.flow_id === flowId).pop();
      if (found) showMeta(meta, found);
      if (!found || found.flow_row_id) return;
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  }

  function pieceOf(line) {
    if (!line.startsWith("data:")) return "";
    const data = line.slice(5).trim();
    if (!data || data === "[DONE]") return "";
    try {
      const choice = (JSON.parse(data).choices || [])[0];
      return (choice && choice.delta && typeof choice.delta.content === "string") ? choice.delta.content : "";
    } catch (e) {
      return "";
    }
  }

  async function readStream(response, answer) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      pending += decoder.decode(value || new Uint8Array(), { stream: !done });
      const lines = pending.split("\n");
      pending = done ? "" : lines.pop();
      for (const line of lines) {
        const piece = pieceOf(line.trim());
        if (piece) answer.append(document.createTextNode(piece));
      }
      if (done) return;
    }
  }

  function number(name) {
    const value = form.elements[name].value.trim();
    return value === "" ? null : Number(value);
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const prompt = form.elements.prompt.value;
    if (!prompt.trim()) return;
    const conversationField = form.elements.conversation;
    const ask = {
      model: form.elements.model.value.trim(),
      prompt: prompt,
      conversation: conversationField.value || null,
      group: form.elements.group.value || null,
      client: form.elements.client.value || null,
      system: form.elements.system.value,
      temperature: number("temperature"),
      max_tokens: number("max_tokens"),
      stream: form.elements.stream.checked,
    };
    const turn = newTurn(prompt);
    send.disabled = true;
    status.textContent = "sending…";
    let conversation = ask.conversation;
    let flowId = null;
    try {
      const response = await fetch("/api/playground/chat", {
        method: "POST",
        headers: { "content-type": "application/json", "x-csrf-token": csrf },
        body: JSON.stringify(ask),
      });
      conversation = response.headers.get("x-keyrotor-conversation") || conversation;
      flowId = response.headers.get("x-keyrotor-flow");
      if (conversation && conversation !== conversationField.value) {
        conversationField.value = conversation;
        history.replaceState(null, "", "/playground?conversation=" + encodeURIComponent(conversation));
      }
      form.elements.prompt.value = "";
      status.textContent = "answering…";
      const type = response.headers.get("content-type") || "";
      if (!response.ok) {
        const text = await response.text();
        let message = "HTTP " + response.status;
        try {
          message = JSON.parse(text).error.message || message;
        } catch (e) { /* not JSON: the status says it */ }
        showError(turn, message);
      } else if (type.startsWith("text/event-stream")) {
        await readStream(response, turn.answer);
      } else {
        const body = await response.json();
        const choice = (body.choices || [])[0];
        turn.answer.textContent = (choice && choice.message && choice.message.content) || "";
      }
      turn.meta.textContent = "";
      status.textContent = "";
    } catch (e) {
      showError(turn, "The request failed: " + e);
      status.textContent = "";
    } finally {
      send.disabled = false;
    }
    if (conversation && flowId) await followFlow(conversation, flowId, turn.meta);
  });

  // Enter sends, Shift+Enter is a new line (as chat apps do); on a phone the Send button does.
  form.elements.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
})();
