// Drives the browser page in Debian's chromium (headless) with playwright-core:
// a private chat streamed over SSE, then a shared session over the WebSocket seen by two
// pages. usage: node chat.mjs BASE_URL SCREENSHOT_DIR   (PLAYWRIGHT_CORE = module path)
const { chromium } = await import(process.env.PLAYWRIGHT_CORE);
const [base, shots] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox"],
});
const fail = (m) => { throw new Error(m); };
// Generous waits: the test suite runs many servers at once on a 2-core machine.
const TIMEOUT = 120000;
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
  page.setDefaultTimeout(TIMEOUT);
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(base + "/#key=sk-sluice-dev");
  await page.waitForFunction(() => document.querySelector("#model").options.length > 0);
  if (page.url().includes("key=")) fail("the key stayed in the address bar");
  await page.fill("#max_tokens", "24");
  await page.fill("#temperature", "0");
  // Shift+Enter is a newline, not a send.
  await page.fill("#input", "Name three colors.");
  await page.press("#input", "Shift+Enter");
  if ((await page.inputValue("#input")) !== "Name three colors.\n") fail("Shift+Enter did not add a newline");
  if ((await page.locator(".msg.user").count()) !== 0) fail("Shift+Enter sent the message");
  // The reply streams in: first partial text, then done. A fast server can finish the
  // whole reply between two of playwright's polls, so a MutationObserver (run before the
  // page's next await, hence before it drops the "streaming" class) records the first
  // text shown while streaming.
  await page.evaluate(() => {
    window.firstPartial = null;
    new MutationObserver(() => {
      const t = document.querySelector(".msg.assistant.streaming .text");
      if (window.firstPartial === null && t && t.textContent) window.firstPartial = t.textContent;
    }).observe(document.body, { subtree: true, childList: true, characterData: true });
  });
  await page.press("#input", "Enter");
  await page.waitForSelector(".msg.assistant[data-done=true]", { timeout: TIMEOUT });
  const raw = await page.textContent(".msg.assistant .text");
  const reply = raw.trim();
  if (!reply) fail("empty reply");
  const partial = await page.evaluate(() => window.firstPartial);
  if (!partial) fail("no text was shown while the reply was streaming");
  if (!raw.startsWith(partial)) fail("the streamed text " + JSON.stringify(partial) + " is not the start of the reply " + JSON.stringify(raw));
  await page.screenshot({ path: shots + "/browser-chat.png" });

  // Shared session: two pages, one asks, both watch the same reply.
  const pages = [page, await browser.newPage({ viewport: { width: 1100, height: 700 } })];
  pages[1].setDefaultTimeout(TIMEOUT);
  // A second browser (its own storage), given the key in the link.
  await pages[1].goto(base + "/#key=sk-sluice-dev");
  for (const [i, p] of pages.entries()) {
    await p.waitForFunction(() => document.querySelector("#model").options.length > 0);
    await p.selectOption("#mode", "session");
    await p.fill("#session", "browser-test");
    await p.fill("#user", i === 0 ? "ann" : "bob");
    await p.fill("#max_tokens", "16");
    await p.fill("#temperature", "0");
    await p.click("#join");
    await p.waitForSelector("text=Joined session browser-test");
  }
  await pages[0].waitForSelector("#participants li:nth-child(2)");
  await pages[0].fill("#input", "Say hello to everyone.");
  await pages[0].press("#input", "Enter");
  const shared = [];
  for (const p of pages) {
    await p.waitForSelector(".msg.assistant[data-done=true]", { timeout: TIMEOUT });
    shared.push((await p.textContent(".msg.assistant .text")).trim());
    const said = await p.textContent(".msg.user .text");
    if (said !== "Say hello to everyone.") fail("the message did not reach every page: " + said);
  }
  if (!shared[0] || shared[0] !== shared[1]) fail("the pages saw different replies: " + JSON.stringify(shared));
  await pages[1].screenshot({ path: shots + "/browser-session.png" });
  if (errors.length) fail("page errors: " + errors.join("; "));
  console.log(JSON.stringify({ reply, shared: shared[0] }));
} finally {
  await browser.close();
}
