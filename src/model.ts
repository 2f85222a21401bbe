/**
 * The tasks of the home as the server extension reports them: pages of records, kept live by its
 * event stream; the one place the front end talks to `{base_url}nbbgtask/api/`.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';

export type TaskState =
  | 'waiting'
  | 'queued'
  | 'running'
  | 'complete'
  | 'failed'
  | 'cancelled';

export const STATES: TaskState[] = [
  'waiting',
  'queued',
  'running',
  'complete',
  'failed',
  'cancelled'
];

/** A task can still be cancelled in these states. */
export const LIVE_STATES: ReadonlySet<string> = new Set([
  'waiting',
  'queued',
  'running'
]);

export interface IResources {
  cpu_percent: number | null;
  rss: number | null;
  uss: number | null;
}

/** One task, as `GET tasks` and the event stream send it. */
export interface ITaskRecord {
  id: string;
  name: string;
  state: TaskState;
  percent: number | null;
  message: string | null;
  created: number;
  started: number | null;
  finished: number | null;
  elapsed: number | null;
  error: string | null;
  start_method: string | null;
  pid: number | null;
  host: string | null;
  cancel_requested: boolean | null;
  resources: IResources | null;
}

export interface IFilter {
  state: TaskState | '';
  name: string;
}

interface ITasksPage {
  tasks: ITaskRecord[];
  next: string | null;
  running: number;
}

interface ITasksEvent {
  tasks: ITaskRecord[];
  ended: string[];
  running: number;
  now: number;
}

/** How a stream or a request went wrong, in words for the panel. */
export class ApiError extends Error {}

/** What the panel says where the server has no `nbbgtask/api/` (a 404 without the API's body). */
const NO_SERVER_EXTENSION =
  "this Jupyter server does not have nbbgtask's server extension: install nbbgtask in the " +
  "server's Python environment (pip install nbbgtask) and restart the server";

/** Tasks per page: the server's default, small enough for a home of 100,000. */
const PAGE = 50;
/** The event stream is reopened after this many ms, doubling up to the maximum, when it drops. */
const RETRY_FIRST = 1000;
const RETRY_MAX = 30000;

export function isFinal(state: string): boolean {
  return !LIVE_STATES.has(state);
}

/**
 * The tasks shown (newest first, those matching the filter, as many pages as were asked for),
 * the number running, and the tasks that end while the page is open.
 */
export class TasksModel implements IDisposable {
  constructor(serverSettings?: ServerConnection.ISettings) {
    this._settings = serverSettings ?? ServerConnection.makeSettings();
  }

  /** Emitted whenever the shown tasks, the running count or the connection change. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Emitted once for each task that reaches a final state while the stream is open. */
  get taskEnded(): ISignal<this, ITaskRecord> {
    return this._taskEnded;
  }

  get tasks(): ITaskRecord[] {
    return this._order.map(id => this._tasks.get(id)!);
  }

  get running(): number {
    return this._running;
  }

  /** Whether there is an older page to load. */
  get hasMore(): boolean {
    return this._next !== null;
  }

  get filter(): IFilter {
    return { ...this._filter };
  }

  /** Why the last request or the stream failed, or `null` while all is well. */
  get problem(): string | null {
    return this._problem;
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  /** Seconds the task has run: the server's figure, or counted on from its start while it runs. */
  elapsed(task: ITaskRecord): number | null {
    if (task.state === 'running' && task.started !== null) {
      return Math.max(0, this.serverNow() - task.started);
    }
    return task.elapsed;
  }

  /** The server's clock now, from the offset the last event carried. */
  serverNow(): number {
    return Date.now() / 1000 + this._clockOffset;
  }

  /** Start following the home: the first page, then the event stream (reopened when it drops). */
  start(): void {
    if (this._started) {
      return;
    }
    this._started = true;
    void this.refresh();
    void this._follow();
  }

  setFilter(filter: Partial<IFilter>): Promise<void> {
    this._filter = { ...this._filter, ...filter };
    return this.refresh();
  }

  /** The first page again (for the filter as it is now). */
  async refresh(): Promise<void> {
    const generation = ++this._generation;
    try {
      const page = await this._page(null);
      if (generation !== this._generation) {
        return; // a newer filter's page is on its way
      }
      this._tasks.clear();
      this._order = [];
      this._take(page);
      this._problem = null;
    } catch (error) {
      this._problem = describe(error);
    }
    this._changed.emit();
  }

  /** The next older page, after the oldest task shown. */
  async loadMore(): Promise<void> {
    if (this._next === null || this._loadingMore) {
      return;
    }
    this._loadingMore = true;
    const generation = this._generation;
    try {
      const page = await this._page(this._next);
      if (generation === this._generation) {
        this._take(page);
        this._problem = null;
      }
    } catch (error) {
      this._problem = describe(error);
    } finally {
      this._loadingMore = false;
    }
    this._changed.emit();
  }

  async cancel(id: string): Promise<ITaskRecord> {
    const answer = await this._request<{ cancelled: boolean; task: ITaskRecord }>(
      `tasks/${encodeURIComponent(id)}/cancel`,
      { method: 'POST' }
    );
    this._apply([answer.task]);
    this._changed.emit();
    return answer.task;
  }

  log(id: string, tail = 200): Promise<{ text: string; truncated: boolean }> {
    return this._request(`tasks/${encodeURIComponent(id)}/log?tail=${tail}`);
  }

  stack(id: string): Promise<{ text: string }> {
    return this._request(`tasks/${encodeURIComponent(id)}/stack`);
  }

  outputs(id: string): Promise<{ outputs: any[] }> {
    return this._request(`tasks/${encodeURIComponent(id)}/outputs`);
  }

  async task(id: string): Promise<ITaskRecord> {
    const answer = await this._request<{ task: ITaskRecord }>(
      `tasks/${encodeURIComponent(id)}`
    );
    return answer.task;
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    this._stream?.abort();
    Signal.clearData(this);
  }

  private _page(before: string | null): Promise<ITasksPage> {
    const query: Record<string, string> = { limit: String(PAGE) };
    if (this._filter.state) {
      query.state = this._filter.state;
    }
    if (this._filter.name) {
      query.name = this._filter.name;
    }
    if (before) {
      query.before = before;
    }
    return this._request<ITasksPage>('tasks' + URLExt.objectToQueryString(query));
  }

  private _take(page: ITasksPage): void {
    for (const task of page.tasks) {
      if (!this._tasks.has(task.id)) {
        this._order.push(task.id);
      }
      this._tasks.set(task.id, task);
    }
    this._next = page.next;
    this._running = page.running;
  }

  /** Records from the stream or a cancel: update the shown ones, add new ones that match. */
  private _apply(records: ITaskRecord[]): void {
    const oldest = this._order.length
      ? this._tasks.get(this._order[this._order.length - 1])!
      : null;
    for (const task of records) {
      const known = this._tasks.has(task.id);
      if (!this._matches(task)) {
        if (known) {
          this._tasks.delete(task.id);
          this._order = this._order.filter(id => id !== task.id);
        }
        continue;
      }
      if (known) {
        this._tasks.set(task.id, task);
        continue;
      }
      // A task older than the last one shown belongs to a page not loaded yet.
      if (this._next !== null && oldest && newer(oldest, task)) {
        continue;
      }
      this._tasks.set(task.id, task);
      this._order.push(task.id);
    }
    this._order.sort((a, b) =>
      newer(this._tasks.get(a)!, this._tasks.get(b)!) ? -1 : 1
    );
  }

  private _matches(task: ITaskRecord): boolean {
    const { state, name } = this._filter;
    return (!state || task.state === state) && (!name || task.name === name);
  }

  /** The event stream, read as long as the model lives; reopened with backoff when it drops. */
  private async _follow(): Promise<void> {
    let delay = RETRY_FIRST;
    while (!this._disposed) {
      const opened = Date.now();
      try {
        await this._readStream();
        this._problem = null;
      } catch (error) {
        if (this._disposed) {
          return;
        }
        const why = describe(error);
        this._problem = why === NO_SERVER_EXTENSION ? why : `live updates stopped: ${why}`;
        this._changed.emit();
      }
      // A stream that stayed open a while was healthy: start the backoff again.
      delay = Date.now() - opened > 60000 ? RETRY_FIRST : delay;
      await sleep(delay);
      delay = Math.min(delay * 2, RETRY_MAX);
      if (!this._disposed) {
        await this.refresh(); // what changed while the stream was closed
      }
    }
  }

  private async _readStream(): Promise<void> {
    this._stream = new AbortController();
    const url = URLExt.join(this._settings.baseUrl, 'nbbgtask/api/events');
    const response = await ServerConnection.makeRequest(
      url,
      {
        headers: { Accept: 'text/event-stream' },
        signal: this._stream.signal,
        cache: 'no-store'
      },
      this._settings
    );
    if (response.status === 404) {
      throw new ApiError(NO_SERVER_EXTENSION);
    }
    if (!response.ok || !response.body) {
      throw new ApiError(`GET events answered ${response.status}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    for (;;) {
      const { done, value } = await reader.read();
      if (done) {
        throw new ApiError('the event stream ended');
      }
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
      let end: number;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        this._onEvent(block);
      }
    }
  }

  /** One server-sent event: `event: tasks` and its `data:` lines; others (comments) are skipped. */
  private _onEvent(block: string): void {
    let kind = 'message';
    const data: string[] = [];
    for (const line of block.split('\n')) {
      if (line.startsWith('event:')) {
        kind = line.slice(6).trim();
      } else if (line.startsWith('data:')) {
        data.push(line.slice(5).replace(/^ /, ''));
      }
    }
    if (kind !== 'tasks' || !data.length) {
      return;
    }
    let event: ITasksEvent;
    try {
      event = JSON.parse(data.join('\n'));
    } catch {
      return;
    }
    if (typeof event.now === 'number') {
      this._clockOffset = event.now - Date.now() / 1000;
    }
    this._running = event.running ?? this._running;
    this._apply(event.tasks ?? []);
    this._problem = null;
    this._changed.emit();
    for (const id of event.ended ?? []) {
      void this._ended(id, event.tasks ?? []);
    }
  }

  private async _ended(id: string, sent: ITaskRecord[]): Promise<void> {
    if (this._endedSeen.has(id)) {
      return;
    }
    this._endedSeen.add(id);
    let task = sent.find(t => t.id === id);
    if (!task || !isFinal(task.state)) {
      try {
        task = await this.task(id);
      } catch {
        return;
      }
    }
    this._taskEnded.emit(task);
  }

  private async _request<T>(path: string, init: RequestInit = {}): Promise<T> {
    const url = URLExt.join(this._settings.baseUrl, 'nbbgtask/api', path);
    let response: Response;
    try {
      response = await ServerConnection.makeRequest(url, init, this._settings);
    } catch (error) {
      throw new ServerConnection.NetworkError(error as TypeError);
    }
    const text = await response.text();
    let body: any = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      body = null;
    }
    if (!response.ok) {
      const why = body && typeof body.error === 'string' ? body.error : text.slice(0, 200);
      if (response.status === 404 && !(body && typeof body.error === 'string')) {
        throw new ApiError(NO_SERVER_EXTENSION); // not the API's own 404 for an unknown task
      }
      throw new ApiError(`${response.status}: ${why || response.statusText}`);
    }
    return body as T;
  }

  private _settings: ServerConnection.ISettings;
  private _tasks = new Map<string, ITaskRecord>();
  private _order: string[] = [];
  private _next: string | null = null;
  private _running = 0;
  private _filter: IFilter = { state: '', name: '' };
  private _problem: string | null = null;
  private _generation = 0;
  private _loadingMore = false;
  private _clockOffset = 0;
  private _started = false;
  private _disposed = false;
  private _stream: AbortController | null = null;
  private _endedSeen = new Set<string>();
  private _changed = new Signal<this, void>(this);
  private _taskEnded = new Signal<this, ITaskRecord>(this);
}

/** Whether `a` is listed before `b`: newest first, as the server orders them. */
function newer(a: ITaskRecord, b: ITaskRecord): boolean {
  return a.created !== b.created ? a.created > b.created : a.id > b.id;
}

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function sleep(ms: number): Promise<void> {
  return new Promise(resolve => setTimeout(resolve, ms));
}

/** `45 s`, `2 min 3 s`, `1 h 2 min`: how long a task ran, in words for a toast. */
export function formatDuration(seconds: number | null): string {
  if (seconds === null || !isFinite(seconds)) {
    return '';
  }
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) {
    return `${s} s`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)} min ${s % 60} s`;
  }
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

/** `0:07`, `12:34`, `1:02:03`: the elapsed column, as the command line and monitor show it. */
export function formatClock(seconds: number | null): string {
  if (seconds === null || !isFinite(seconds)) {
    return '';
  }
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const pad = (n: number) => String(n).padStart(2, '0');
  return h ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
}

/** `1.5 GiB`, `200 MiB`: memory as the monitor and the command line write it. */
export function formatBytes(bytes: number | null): string {
  if (bytes === null || !isFinite(bytes)) {
    return '';
  }
  let value = bytes;
  for (const unit of ['B', 'KiB', 'MiB', 'GiB']) {
    if (Math.abs(value) < 1024 || unit === 'GiB') {
      return unit === 'B'
        ? `${value.toFixed(0)} B`
        : `${value.toFixed(1)} ${unit}`.replace('.0 ', ' ');
    }
    value /= 1024;
  }
  return '';
}

/** `CPU 12% · 1.5 GiB`: what a running task costs, as the monitor writes it. */
export function formatResources(resources: IResources | null): string {
  if (!resources) {
    return '';
  }
  const memory = formatBytes(resources.rss ?? resources.uss);
  const cpu = resources.cpu_percent;
  if (cpu === null || cpu === undefined) {
    return memory;
  }
  return memory ? `CPU ${cpu.toFixed(0)}% · ${memory}` : `CPU ${cpu.toFixed(0)}%`;
}
