// Type definitions for fanout.js, the browser client of fanout's wire protocol v1.

/** An ext value the decoder does not interpret. */
export class Ext {
  constructor(type: number, data: Uint8Array);
  type: number;
  data: Uint8Array;
}

/** How deep the arrays and maps of one `data` value may nest (32): the engine refuses deeper values. */
export const MAX_DATA_DEPTH: number;
/** Containers around a value in a server message (3): the message, `items`, a stream event. */
export const ENVELOPE_DEPTH: number;
/** MAX_DATA_DEPTH + ENVELOPE_DEPTH: the default `maxDepth` of decodeAll. */
export const CLIENT_MAX_DEPTH: number;

/** A value this client could not decode (not UTF-8, nested deeper than MAX_DATA_DEPTH). */
export class Undecodable {
  constructor(reason: string);
  reason: string;
}

/** Every msgpack value in `bytes` (a frame may hold several messages). Throws RangeError on truncated input or nesting past `maxDepth` (default CLIENT_MAX_DEPTH), TypeError on a string that is not UTF-8. */
export function decodeAll(bytes: Uint8Array | ArrayBuffer, options?: { maxDepth?: number }): unknown[];
/** Every message of a server frame; a value in `items` it cannot decode becomes an Undecodable. Throws only for a broken frame. */
export function decodeFrame(bytes: Uint8Array | ArrayBuffer): Record<string, unknown>[];
/** [key (or a stream event's position), Undecodable] of every value of `change` the client could not decode. */
export function undecodableIn(change: Change): Array<[string, Undecodable]>;
/** Exactly one msgpack value. */
export function decode(bytes: Uint8Array | ArrayBuffer): unknown;
/** msgpack bytes of a value (null, boolean, number, bigint, string, Uint8Array, array, Map, object). */
export function encode(value: unknown): Uint8Array;

export type ConnectionState = "idle" | "connecting" | "connected" | "waiting" | "unauthorized" | "closed";
export const STATES: readonly ConnectionState[];
export const AUTH_CLOSE_CODES: ReadonlySet<number>;

/** What one server message changed in a topic's view. */
export interface Change {
  topic: string;
  kind: "snap" | "upd" | "evt" | "gap";
  /** Position of the newest update the message reflects. */
  pos: string | null;
  /** A `snap` with full: true replaced the view; full: false was merged. */
  full: boolean;
  epoch?: string;
  /** Changed keys and their new values; null means the key was deleted. */
  items: Record<string, unknown>;
  /** Stream topics: [pos, data] in order. */
  events?: Array<[string, unknown]>;
  /** `gap`: events between these positions were lost. */
  from?: string;
  to?: string;
}

export interface TopicState {
  items: Map<string, unknown>;
  epoch: string | null;
  pos: string | null;
}

export class StateView {
  topics: Map<string, TopicState>;
  view(topic: string): TopicState;
  forget(topic: string): void;
  since(topics?: string[]): Record<string, [string, string]>;
  apply(msg: Record<string, unknown>): Change | null;
}

export interface BackoffOptions {
  /** Ceiling of the first retry (ms); retry n waits rand * min(maxMs, baseMs * factor**n). Default 250. */
  baseMs?: number;
  /** Cap (ms). Default 30000. */
  maxMs?: number;
  /** Default 2. */
  factor?: number;
  /** A connection up this long ends the streak (ms). Default 30000. */
  stableMs?: number;
}

export class Reconnector {
  constructor(options?: BackoffOptions);
  blocked: boolean;
  failures: number;
  ceilingMs(attempt: number): number;
  connected(now: number): void;
  bye(retryMs: number): void;
  closed(now: number, code: number): void;
  failed(now: number): void;
  newToken(): void;
  /** A token provider gave a new token: no longer blocked, the failure streak kept. */
  unblock(): void;
  /** Delay before the next attempt; null while blocked on a new token (after 4001/4003). */
  delayMs(rand: number): number | null;
}

/** When a token provider is asked for the next token (engine/client/tokens.py). */
export interface TokenRefreshOptions {
  /** Refresh max(minMarginMs, marginFraction * lifetime) before the token's `exp`, never
   * before half its lifetime. Default 0.1. */
  marginFraction?: number;
  /** Default 1000 (ms). */
  minMarginMs?: number;
  /** A provider call taking longer has failed (ms). Default 10000. */
  timeoutMs?: number;
}

export const TOKEN_REFRESH: Readonly<Required<TokenRefreshOptions>>;
export const MAX_TOKEN_CHARS: number;
/** A JWT's `exp` in ms since the epoch, read without verification; null if it has none that can be read. */
export function tokenExpiryMs(token: string): number | null;
/** When the refresh of a token is due (ms since the epoch); null for a token with no known `exp`. */
export function refreshAtMs(expMs: number | null, obtainedAtMs: number, options?: TokenRefreshOptions): number | null;

export interface ClientOptions {
  /** Sent in the first message (`auth`). */
  token?: string | null;
  /**
   * Called for a token before the first connection, before the current token's `exp`
   * (the new token is sent in `auth` on the live connection) and after a 4001/4003 close.
   * A failure ("error" event, code "token_provider") is retried with backoff.
   */
  tokenProvider?: () => string | Promise<string>;
  tokenRefresh?: TokenRefreshOptions;
  backoff?: BackoffOptions;
  /** Over this bufferedAmount, sends wait in the outbox. Default 1 MiB. */
  maxBufferedBytes?: number;
  /** Messages the outbox holds at most; beyond, send() returns false. Default 1000. */
  maxOutbox?: number;
  /** Time for hello (and the auth ack) before the attempt is abandoned. Default 10000. */
  connectTimeoutMs?: number;
  /** Injectable for tests. */
  WebSocket?: typeof WebSocket;
  random?: () => number;
  now?: () => number;
  /** Wall clock (ms since the epoch) a token's `exp` is compared with. Default Date.now. */
  wall?: () => number;
}

export interface Counters {
  connects: number;
  connectFailures: number;
  disconnects: number;
  messages: number;
  frames: number;
  snapsFull: number;
  snapsPartial: number;
  updates: number;
  byes: number;
  sendRefused: number;
  /** Values the client could not decode (each reported as an "error" event with code "bad_value"). */
  badValues: number;
  /** Tokens the provider gave. */
  tokenRefreshes: number;
  /** Of them, sent in `auth` on a live connection. */
  tokenAuths: number;
  /** Provider calls that failed (each an "error" event with code "token_provider"). */
  tokenFailures: number;
  lastCloseCode: number | null;
  lastRetryMs: number | null;
}

export interface FanoutEventMap {
  state: CustomEvent<{ state: ConnectionState }>;
  change: CustomEvent<Change>;
  /** A server `err` (its code), "bad_value" (a value this client cannot decode: `topic`, `key`
   * (a stream event's position), the view holds an Undecodable; the connection stays up), or
   * "bad_frame" (a broken frame: the client closes 1002 and reconnects), or "token_provider"
   * (the token provider failed: `error` is what it threw; it is called again after a backoff
   * delay and the connection is kept). */
  error: CustomEvent<{ code: string; msg: string; topic?: string | null; key?: string; error?: unknown }>;
  bye: CustomEvent<{ op: "bye"; reason: string; retry_ms: number }>;
}

export class FanoutClient extends EventTarget {
  constructor(url: string, options?: ClientOptions);
  readonly url: string;
  token: string | null;
  tokenRefresh: Required<TokenRefreshOptions>;
  state: ConnectionState;
  counters: Counters;
  view: StateView;
  reconnector: Reconnector;
  connect(): this;
  close(): void;
  setToken(token: string | null): void;
  /** The latest value of every key of `topic` (read it, don't change it). */
  topic(name: string): Map<string, unknown>;
  /** Resolves once every topic's snapshot is in the view; rejects (with `code`) if refused. */
  subscribe(topics: string[], options?: { maxHz?: number | null }): Promise<void>;
  unsubscribe(topics: string[]): void;
  /** Resolves with the position once the bus accepted it (needs permission to publish). */
  publish(topic: string, key: string, data: unknown): Promise<string>;
  /** bufferedAmount-aware send; false when refused (outbox full or not connected). */
  send(msg: Record<string, unknown>): boolean;
  addEventListener<K extends keyof FanoutEventMap>(
    type: K,
    listener: (ev: FanoutEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
}
