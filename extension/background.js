// devstack browser extension: the service worker. It owns the one declarativeNetRequest dynamic
// rule that sets `x-devstack-key: KEY` on requests to the chosen hosts (rules.js builds it), keeps
// {key, patterns} in chrome.storage.local, restores rule and badge when the browser starts, and
// shows the active key on the badge. The popup talks to it with messages; so can a test.
//
// Driving it from a test (headless Chromium with --load-extension=extension/):
//   1. Find the extension id (the service worker target's URL is chrome-extension://ID/background.js).
//   2. Open chrome-extension://ID/popup.html in a tab and evaluate there, awaiting each promise
//      (CDP: Runtime.evaluate with awaitPromise: true):
//        await devstack.setKey('alice', ['*.localhost', 'localhost'])  // -> state, or rejects with an Error
//        await devstack.getState()   // -> {key, patterns, rule, permitted, origins}
//        await devstack.clearKey()   // -> state with key null and rule null
//      The popup shows each new state (#status; #error for a refused Save), and the badge text
//      is chrome.action.getBadgeText({}). Each call is chrome.runtime.sendMessage({type: 'setKey',
//      key, patterns}) / {type: 'getState'} / {type: 'clearKey'}, answered {ok: true, state} or
//      {ok: false, error}; any page of the extension can send those messages itself. The form
//      works too: set #key (and #patterns, one host per line) and click #save or #clear.
//   3. Or evaluate the same calls in the service worker target itself: globalThis.devstack there
//      holds them (setKey, clearKey, getState, restore).
// The default hosts are granted at install (manifest host_permissions), so no permission prompt is
// involved; other hosts need chrome.permissions.request, which Chrome only allows in a user
// gesture in the popup (the Save button does it; state.permitted says whether the rule can act).

import { DEFAULT_PATTERNS, RULE_ID, badgeText, buildRule, originsFor, parsePatterns } from './rules.js';

const STORE = 'devstack';
const BADGE_COLOR = '#0b7285';

async function stored() {
  const { [STORE]: value } = await chrome.storage.local.get(STORE);
  const key = typeof value?.key === 'string' && value.key !== '' ? value.key : null;
  const patterns = Array.isArray(value?.patterns) ? value.patterns : [...DEFAULT_PATTERNS];
  return { key, patterns };
}

async function showBadge(key, patterns) {
  await chrome.action.setBadgeBackgroundColor({ color: BADGE_COLOR });
  await chrome.action.setBadgeText({ text: badgeText(key) });
  await chrome.action.setTitle({
    title: key ? `devstack key: ${key}\non ${patterns.join(', ')}` : 'devstack: no key (baseline)',
  });
}

async function getState() {
  const { key, patterns } = await stored();
  const rules = await chrome.declarativeNetRequest.getDynamicRules();
  const rule = rules.find((r) => r.id === RULE_ID) ?? null;
  const origins = originsFor(patterns);
  const permitted = origins.length > 0 && (await chrome.permissions.contains({ origins }));
  return { key, patterns, rule, permitted, origins };
}

async function setKey(key, patterns = DEFAULT_PATTERNS) {
  const rule = buildRule(key, patterns); // throws on a bad key or pattern: nothing changes then
  const parsed = parsePatterns(patterns).patterns;
  await chrome.declarativeNetRequest.updateDynamicRules({ removeRuleIds: [RULE_ID], addRules: [rule] });
  await chrome.storage.local.set({ [STORE]: { key, patterns: parsed } });
  await showBadge(key, parsed);
  return getState();
}

async function clearKey() {
  await chrome.declarativeNetRequest.updateDynamicRules({ removeRuleIds: [RULE_ID] });
  const { patterns } = await stored();
  await chrome.storage.local.set({ [STORE]: { key: null, patterns } }); // the hosts stay for next time
  await showBadge(null, patterns);
  return getState();
}

/** Rule and badge from storage: dynamic rules survive a restart, the badge does not, and a stored
 * state that no longer builds (an edited rules.js) must not leave a stale rule behind. */
async function restore() {
  const { key, patterns } = await stored();
  if (key === null) return clearKey();
  try {
    return await setKey(key, patterns);
  } catch (error) {
    console.warn('devstack: stored key not restored:', error);
    return clearKey();
  }
}

// One change at a time: two quick saves must not interleave their rule and storage updates.
let queue = Promise.resolve();
function serial(job) {
  const run = queue.then(() => job());
  queue = run.catch(() => {}); // a failed change does not block the next one
  return run;
}

const HANDLERS = {
  setKey: (message) => setKey(message.key, message.patterns ?? DEFAULT_PATTERNS),
  clearKey: () => clearKey(),
  getState: () => getState(),
};

chrome.runtime.onMessage.addListener((message, sender, sendResponse) => {
  const handler = sender.id === chrome.runtime.id ? HANDLERS[message?.type] : undefined;
  if (handler === undefined) return false;
  serial(() => handler(message)).then(
    (state) => sendResponse({ ok: true, state }),
    (error) => sendResponse({ ok: false, error: String(error?.message ?? error) }),
  );
  return true; // the answer comes asynchronously
});

chrome.runtime.onStartup.addListener(() => serial(restore));
chrome.runtime.onInstalled.addListener(() => serial(restore));

globalThis.devstack = {
  setKey: (key, patterns) => serial(() => setKey(key, patterns ?? DEFAULT_PATTERNS)),
  clearKey: () => serial(clearKey),
  getState: () => serial(getState),
  restore: () => serial(restore),
};
