// The popup: a key, the hosts it applies to, Save and Clear. The service worker (background.js)
// owns the rule; this page validates, asks Chrome for host access the hosts need, and sends it
// messages. The same calls are on window.devstack for a test that opens popup.html (see the
// comment at the top of background.js).

import { DEFAULT_PATTERNS, keyError, originsFor, parsePatterns } from './rules.js';

const $ = (id) => document.getElementById(id);

async function send(message) {
  const answer = await chrome.runtime.sendMessage(message);
  if (!answer?.ok) throw new Error(answer?.error ?? 'no answer from the service worker');
  return answer.state;
}

/** Each call resolves to the new state (and shows it here), or rejects with what was wrong. */
const devstack = {
  /** Sets the key on the hosts (default: the demo's *.localhost). */
  setKey: (key, patterns = DEFAULT_PATTERNS) => send({ type: 'setKey', key, patterns }).then(show),
  /** Removes the rule and the badge; the hosts are kept for next time. */
  clearKey: () => send({ type: 'clearKey' }).then(show),
  /** {key, patterns, rule, permitted, origins} */
  getState: () => send({ type: 'getState' }).then(show),
};
window.devstack = devstack;

function showError(message) {
  $('error').textContent = message ?? '';
  $('error').hidden = !message;
}

function show(state) {
  $('key').value = state.key ?? '';
  $('patterns').value = state.patterns.join('\n');
  const status = $('status');
  status.className = '';
  if (state.key === null || state.rule === null) {
    status.textContent = 'No key: requests go to the baselines.';
  } else if (!state.permitted) {
    status.className = 'warning';
    status.textContent = `Key ${state.key} saved, but Chrome has not granted access to ${state.patterns.join(', ')}: Save again to grant it.`;
  } else {
    status.className = 'active';
    status.textContent = `Active: x-devstack-key: ${state.key} on ${state.patterns.join(', ')}`;
  }
  return state;
}

/** Host access the patterns need beyond what the manifest grants at install (the *.localhost
 * names). Chrome only allows permissions.request during a user gesture, so Save calls this before
 * anything else awaits; default hosts need no request, which keeps window.devstack.setKey
 * scriptable. */
function requestAccess(patterns) {
  const granted = new Set(chrome.runtime.getManifest().host_permissions ?? []);
  const origins = originsFor(patterns).filter((origin) => !granted.has(origin));
  return origins.length === 0 ? Promise.resolve(true) : chrome.permissions.request({ origins });
}

async function save(event) {
  event.preventDefault();
  showError(null);
  const key = $('key').value.trim();
  const parsed = parsePatterns($('patterns').value);
  const problems = [keyError(key), ...parsed.errors].filter((p) => p !== null);
  if (parsed.patterns.length === 0 && parsed.errors.length === 0) problems.push('add at least one host');
  $('key').setAttribute('aria-invalid', String(keyError(key) !== null));
  $('patterns').setAttribute('aria-invalid', String(parsed.errors.length > 0 || parsed.patterns.length === 0));
  if (problems.length > 0) {
    showError(problems.join('; '));
    return;
  }
  // Asked first, while the click is a gesture; the rule is saved meanwhile, so a popup that
  // closes under Chrome's prompt still leaves the key set (it acts once access is granted).
  const access = requestAccess(parsed.patterns).catch(() => false);
  try {
    await devstack.setKey(key, parsed.patterns);
    if (!(await access)) showError(`Chrome has no access to ${parsed.patterns.join(', ')}: the key is not sent there`);
    await devstack.getState(); // permitted, now that the prompt is answered
  } catch (error) {
    showError(error.message);
  }
}

async function clear() {
  showError(null);
  try {
    await devstack.clearKey();
  } catch (error) {
    showError(error.message);
  }
}

async function init() {
  $('form').addEventListener('submit', save);
  $('clear').addEventListener('click', clear);
  try {
    await devstack.getState();
  } catch (error) {
    $('patterns').value = DEFAULT_PATTERNS.join('\n');
    showError(error.message);
  }
}

init();
