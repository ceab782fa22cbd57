// The pure half of the extension: what the rule is, which keys and host patterns are valid, and
// which host permissions a set of patterns needs. No chrome.* API here, so the service worker,
// the popup and a plain `node` (tests/test_extension.py) all import this one module.

/** The one dynamic rule this extension owns; replaced on every save, removed on clear. */
export const RULE_ID = 1;

/** The router's private edge header: it merges the key into `baggage` as `devstack=KEY`.
 * DNR cannot append to `baggage` (Chromium rejects `append` for it), and `set` would erase the
 * page's own members, hence a header of our own. */
export const KEY_HEADER = 'x-devstack-key';

/** Every resource type, navigation included: without `main_frame` the page itself would be
 * served by the baseline, without `websocket` its sockets would. */
export const RESOURCE_TYPES = Object.freeze([
  'main_frame',
  'sub_frame',
  'xmlhttprequest',
  'websocket',
  'image',
  'script',
  'stylesheet',
  'font',
  'media',
  'object',
  'ping',
  'csp_report',
  'other',
]);

/** Hosts the key applies to unless the user says otherwise: the demo's `*.localhost` names. */
export const DEFAULT_PATTERNS = Object.freeze(['*.localhost', 'localhost']);

/** The badge is a few pixels wide: the key's first four characters. */
export const BADGE_LENGTH = 4;

const LABEL = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;
const IPV4 = /^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}$/;

/** Null when `key` is a valid routing key (a DNS-1123 label, as the router requires), else why not. */
export function keyError(key) {
  if (typeof key !== 'string' || key.length === 0) return 'the key is empty';
  if (key.length > 63) return 'the key is longer than 63 characters';
  if (!/^[a-z0-9-]+$/.test(key)) return 'the key may only hold a-z, 0-9 and -';
  if (!LABEL.test(key)) return 'the key may not start or end with -';
  return null;
}

/** Null when `pattern` is a host pattern (`example.com`, `*.example.com` or an IPv4 address), else why not. */
export function patternError(pattern) {
  if (typeof pattern !== 'string' || pattern.length === 0) return 'empty host pattern';
  if (IPV4.test(pattern)) return null;
  const host = pattern.startsWith('*.') ? pattern.slice(2) : pattern;
  if (host.length > 253) return `${pattern}: longer than 253 characters`;
  if (/[/:@?#]/.test(host)) return `${pattern}: a host name only, without scheme, port or path`;
  const labels = host.split('.');
  if (!labels.every((label) => LABEL.test(label))) {
    return `${pattern}: not a host name (labels of a-z, 0-9 and -, or *. in front)`;
  }
  if (/^[0-9]+$/.test(labels[labels.length - 1])) return `${pattern}: not an IPv4 address`;
  return null;
}

/**
 * Host patterns from the popup's text (one per line) or from a list: trimmed, lower-cased, empty
 * lines and duplicates dropped. Returns {patterns, errors}.
 */
export function parsePatterns(input) {
  const items = Array.isArray(input) ? input : String(input ?? '').split(/[\n,]/);
  const patterns = [];
  const errors = [];
  for (const item of items) {
    const pattern = String(item).trim().toLowerCase().replace(/\.$/, '');
    if (pattern === '') continue;
    const error = patternError(pattern);
    if (error !== null) errors.push(error);
    else if (!patterns.includes(pattern)) patterns.push(pattern);
  }
  return { patterns, errors };
}

/** The `requestDomains` of the rule. A domain there also covers its subdomains, as `*.` does in
 * Chrome's match patterns, so `example.com` and `*.example.com` both become `example.com`. */
export function requestDomains(patterns) {
  const domains = [];
  for (const pattern of patterns) {
    const domain = pattern.startsWith('*.') ? pattern.slice(2) : pattern;
    if (!domains.includes(domain)) domains.push(domain);
  }
  return domains;
}

/** Schemes a host permission must name: `*` is http and https only, and without a ws/wss
 * permission Chromium leaves WebSocket handshakes unmodified (measured: the page's socket reached
 * the baseline while its fetches carried the key). */
const PERMISSION_SCHEMES = Object.freeze(['*', 'ws', 'wss']);

/** The host permissions (match patterns) the rule needs to act on these hosts: http(s) and
 * ws(s), any port, the domain and every subdomain. Checked (and, from the popup, requested) on
 * saving. */
export function originsFor(patterns) {
  const origins = [];
  for (const domain of requestDomains(patterns)) {
    const host = IPV4.test(domain) ? domain : `*.${domain}`;
    for (const scheme of PERMISSION_SCHEMES) origins.push(`${scheme}://${host}/*`);
  }
  return origins;
}

/**
 * The dynamic rule that sets `x-devstack-key: KEY` on every request to the hosts. Throws an Error
 * saying what is wrong with the key or the patterns.
 */
export function buildRule(key, patterns = DEFAULT_PATTERNS) {
  const error = keyError(key);
  if (error !== null) throw new Error(error);
  const parsed = parsePatterns(patterns);
  if (parsed.errors.length > 0) throw new Error(parsed.errors.join('; '));
  if (parsed.patterns.length === 0) throw new Error('no host pattern: the key would apply nowhere');
  return {
    id: RULE_ID,
    priority: 1,
    action: {
      type: 'modifyHeaders',
      requestHeaders: [{ header: KEY_HEADER, operation: 'set', value: key }],
    },
    condition: {
      requestDomains: requestDomains(parsed.patterns),
      resourceTypes: [...RESOURCE_TYPES],
    },
  };
}

/** What the badge shows for a key: its first characters, or nothing without a key. */
export function badgeText(key) {
  return key ? key.slice(0, BADGE_LENGTH) : '';
}
