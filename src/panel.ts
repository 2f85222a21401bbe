/**
 * The Tasks panel: one row per task of the home with its bar, and the row's log, stack and
 * outputs; every piece of task text goes in as text (textContent), never as markup.
 */
import { OutputArea, OutputAreaModel } from '@jupyterlab/outputarea';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { LabIcon } from '@jupyterlab/ui-components';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import {
  formatClock,
  formatResources,
  isFinal,
  ITaskRecord,
  STATES,
  TaskState,
  TasksModel
} from './model';

export const PANEL_ID = 'nbbgtask-tasks-panel';

/** A stack of three bars: the panel's tab and the status-bar item. */
export const tasksIcon = new LabIcon({
  name: 'nbbgtask:tasks',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">' +
    '<g class="jp-icon3" fill="#616161">' +
    '<rect x="3" y="4" width="18" height="4" rx="1" opacity="0.35"/>' +
    '<rect x="3" y="4" width="13" height="4" rx="1"/>' +
    '<rect x="3" y="10" width="18" height="4" rx="1" opacity="0.35"/>' +
    '<rect x="3" y="10" width="7" height="4" rx="1"/>' +
    '<rect x="3" y="16" width="18" height="4" rx="1"/>' +
    '</g></svg>'
});

/** How often an open log is read again while its task runs, and the lines it shows. */
const LOG_REFRESH_MS = 1500;
const LOG_TAIL = 200;

type Action = 'cancel' | 'log' | 'stack' | 'outputs';

export class TasksPanel extends Widget {
  constructor(options: TasksPanel.IOptions) {
    super();
    this._model = options.model;
    this._rendermime = options.rendermime;
    this.id = PANEL_ID;
    this.addClass('nbbgtask-TasksPanel');
    this.title.icon = tasksIcon;
    this.title.caption = 'Background tasks (nbbgtask)';

    const header = el('div', 'nbbgtask-header');
    header.append(el('h2', 'nbbgtask-title', 'Background tasks'));
    header.append(this._runningNode);
    this.node.append(header);

    this._notifyButton.dataset.action = 'enable-notifications';
    this._notifyButton.addEventListener('click', () => void this._askNotify());
    this.node.append(this._notifyNode);
    this._notifyNode.append(this._notifyButton);

    const filters = el('div', 'nbbgtask-filters');
    this._stateSelect.dataset.filter = 'state';
    this._stateSelect.title = 'Show the tasks in this state';
    this._stateSelect.append(option('', 'all states'));
    for (const state of STATES) {
      this._stateSelect.append(option(state, state));
    }
    this._stateSelect.addEventListener('change', () =>
      void this._model.setFilter({
        state: this._stateSelect.value as TaskState | ''
      })
    );
    this._nameInput.type = 'search';
    this._nameInput.dataset.filter = 'name';
    this._nameInput.placeholder = 'name';
    this._nameInput.title = 'Show the tasks of this exact name';
    this._nameInput.addEventListener('input', () => {
      window.clearTimeout(this._nameTimer);
      this._nameTimer = window.setTimeout(
        () => void this._model.setFilter({ name: this._nameInput.value.trim() }),
        300
      );
    });
    filters.append(this._stateSelect, this._nameInput);
    this.node.append(filters);

    this.node.append(this._problemNode, this._list, this._emptyNode);
    this._moreButton.dataset.action = 'load-more';
    this._moreButton.addEventListener('click', () => void this._model.loadMore());
    this.node.append(this._moreButton);

    this._model.changed.connect(this._render, this);
    this._render();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    window.clearInterval(this._ticker);
    for (const row of this._rows.values()) {
      row.dispose();
    }
    this._rows.clear();
    this._model.changed.disconnect(this._render, this);
    super.dispose();
  }

  protected onAfterShow(msg: Message): void {
    this._render();
    // The elapsed time of running tasks counts on between events.
    this._ticker = window.setInterval(() => {
      for (const row of this._rows.values()) {
        row.tick();
      }
    }, 1000);
  }

  protected onBeforeHide(msg: Message): void {
    window.clearInterval(this._ticker);
  }

  private _render(): void {
    const model = this._model;
    const running = model.running;
    this._runningNode.textContent = `${running} running`;
    this._runningNode.dataset.running = String(running);
    this._problemNode.textContent = model.problem ?? '';
    this._problemNode.hidden = !model.problem;
    this._renderNotify();

    const tasks = model.tasks;
    const seen = new Set<string>();
    let before: ChildNode | null = this._list.firstChild;
    for (const task of tasks) {
      seen.add(task.id);
      let row = this._rows.get(task.id);
      if (!row) {
        row = new TaskRow(task, this._model, this._rendermime);
        this._rows.set(task.id, row);
      } else {
        row.update(task);
      }
      if (row.node !== before) {
        this._list.insertBefore(row.node, before);
      } else {
        before = before.nextSibling;
      }
    }
    for (const [id, row] of this._rows) {
      if (!seen.has(id)) {
        row.dispose();
        this._rows.delete(id);
      }
    }
    this._emptyNode.textContent = model.filter.state || model.filter.name
      ? 'No task matches.'
      : 'No tasks yet. Tasks started with bg.run, a task class, %%bgtask or a script show here.';
    this._emptyNode.hidden = tasks.length > 0;
    this._moreButton.hidden = !model.hasMore;
  }

  private _renderNotify(): void {
    const api = window.Notification;
    if (!api) {
      this._notifyNode.hidden = true;
      return;
    }
    this._notifyNode.hidden = api.permission === 'granted';
    this._notifyButton.hidden = api.permission !== 'default';
    this._notifyButton.textContent = 'Enable desktop notifications';
    if (api.permission === 'denied') {
      this._notifyNode.dataset.blocked = 'true';
      this._notifyNode.title =
        'This browser blocks notifications from this page; JupyterLab still shows its own.';
    }
  }

  private async _askNotify(): Promise<void> {
    try {
      await window.Notification.requestPermission();
    } finally {
      this._renderNotify();
    }
  }

  private _model: TasksModel;
  private _rendermime: IRenderMimeRegistry;
  private _rows = new Map<string, TaskRow>();
  private _runningNode = el('span', 'nbbgtask-running');
  private _notifyNode = el('div', 'nbbgtask-notify');
  private _notifyButton = el('button', 'jp-mod-styled nbbgtask-button');
  private _stateSelect = el('select', 'jp-mod-styled nbbgtask-state-filter');
  private _nameInput = el('input', 'jp-mod-styled nbbgtask-name-filter');
  private _problemNode = el('div', 'nbbgtask-problem');
  private _list = el('ul', 'nbbgtask-list');
  private _emptyNode = el('div', 'nbbgtask-empty');
  private _moreButton = el('button', 'jp-mod-styled nbbgtask-button nbbgtask-more', 'Load more');
  private _nameTimer = 0;
  private _ticker = 0;
}

export namespace TasksPanel {
  export interface IOptions {
    model: TasksModel;
    rendermime: IRenderMimeRegistry;
  }
}

/** One task's row: built once, then updated in place so an open log or outputs stays open. */
class TaskRow {
  constructor(
    task: ITaskRecord,
    model: TasksModel,
    rendermime: IRenderMimeRegistry
  ) {
    this._task = task;
    this._model = model;
    this._rendermime = rendermime;
    this.node.dataset.taskId = task.id;

    const head = el('div', 'nbbgtask-row-head');
    this._name.title = task.id;
    head.append(this._name, this._state, this._elapsed);
    this._bar.setAttribute('role', 'progressbar');
    this._bar.setAttribute('aria-valuemin', '0');
    this._bar.setAttribute('aria-valuemax', '100');
    this._bar.append(this._fill);
    const actions = el('div', 'nbbgtask-actions');
    for (const [action, label] of [
      ['cancel', 'Cancel'],
      ['log', 'Log'],
      ['stack', 'Stack'],
      ['outputs', 'Outputs']
    ] as [Action, string][]) {
      const button = el('button', 'jp-mod-styled nbbgtask-button', label);
      button.dataset.action = action;
      button.addEventListener('click', () => void this._onAction(action));
      this._buttons[action] = button;
      actions.append(button);
    }
    this._detail.hidden = true;
    this.node.append(head, this._bar, this._message, this._resources, actions, this._detail);
    this.update(task);
  }

  readonly node = el('li', 'nbbgtask-row');

  update(task: ITaskRecord): void {
    const was = this._task.state;
    this._task = task;
    this.node.dataset.state = task.state;
    this._name.textContent = task.name;
    this._state.textContent = task.cancel_requested && !isFinal(task.state)
      ? `${task.state} (cancelling)`
      : task.state;
    this._state.className = `nbbgtask-state nbbgtask-state-${task.state}`;
    const percent = Math.max(0, Math.min(100, task.percent ?? 0));
    const shown = task.state === 'complete' ? 100 : percent;
    this._fill.style.width = `${shown}%`;
    this._bar.setAttribute('aria-valuenow', String(Math.round(shown)));
    this._bar.title = `${percent.toFixed(0)}%`;
    const text = task.state === 'failed' && task.error
      ? lastLine(task.error)
      : task.message ?? '';
    this._message.textContent = text;
    this._message.title = task.state === 'failed' && task.error ? task.error : text;
    this._resources.textContent = task.state === 'running' ? formatResources(task.resources) : '';
    this._resources.hidden = !this._resources.textContent;
    this._buttons.cancel.hidden = isFinal(task.state);
    this._buttons.cancel.disabled = Boolean(task.cancel_requested);
    this._buttons.stack.disabled = task.state !== 'running' && this._open !== 'stack';
    this.tick();
    // An open log or outputs gets what the task wrote last, once, as it ends.
    if (!isFinal(was) && isFinal(task.state) && (this._open === 'log' || this._open === 'outputs')) {
      void this._show(this._open);
    }
  }

  /** The elapsed column, counted on while the task runs. */
  tick(): void {
    this._elapsed.textContent = formatClock(this._model.elapsed(this._task));
  }

  dispose(): void {
    this._close();
    this.node.remove();
  }

  private async _onAction(action: Action): Promise<void> {
    if (action === 'cancel') {
      this._buttons.cancel.disabled = true;
      try {
        await this._model.cancel(this._task.id);
      } catch (error) {
        this._buttons.cancel.disabled = false;
        this._showText('nbbgtask-error', `Cancel failed: ${describe(error)}`, 'cancel');
      }
      return;
    }
    if (this._open === action) {
      this._close();
      return;
    }
    this._close();
    this._open = action;
    this._buttons[action].classList.add('nbbgtask-mod-open');
    this._buttons[action].setAttribute('aria-pressed', 'true');
    this._detail.hidden = false;
    this._detail.dataset.view = action;
    await this._show(action);
    if (action === 'log') {
      this._timer = window.setInterval(() => {
        if (!isFinal(this._task.state)) {
          void this._show('log');
        }
      }, LOG_REFRESH_MS);
    }
  }

  private async _show(action: Action): Promise<void> {
    const id = this._task.id;
    try {
      if (action === 'log') {
        const log = await this._model.log(id, LOG_TAIL);
        const text = log.text || '(the log is empty)';
        this._showText('nbbgtask-log', (log.truncated ? '…\n' : '') + text, action, true);
      } else if (action === 'stack') {
        const stack = await this._model.stack(id);
        this._showText('nbbgtask-stack', stack.text, action);
      } else if (action === 'outputs') {
        const answer = await this._model.outputs(id);
        this._showOutputs(answer.outputs);
      }
    } catch (error) {
      const why = /^409\b/.test(describe(error))
        ? 'The task has ended: it has no stack.'
        : describe(error);
      this._showText('nbbgtask-error', why, action);
    }
  }

  /** Text in a <pre>; a log keeps its scroll at the end unless the reader scrolled up. */
  private _showText(cls: string, text: string, action: Action, follow = false): void {
    if (this._open !== action) {
      return; // closed, or another view opened, while it loaded
    }
    let pre = this._detail.querySelector('pre');
    if (!pre || pre.className !== cls) {
      this._clearDetail();
      pre = el('pre', cls);
      this._detail.append(pre);
    }
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    if (pre.textContent !== text) {
      pre.textContent = text;
    }
    if (follow && atEnd) {
      pre.scrollTop = pre.scrollHeight;
    }
  }

  /** The task's output bundles, rendered by JupyterLab's own output area, as untrusted output. */
  private _showOutputs(outputs: any[]): void {
    if (this._open !== 'outputs') {
      return;
    }
    this._clearDetail();
    if (!outputs.length) {
      this._detail.append(el('div', 'nbbgtask-empty', 'The task has shown no outputs.'));
      return;
    }
    const model = new OutputAreaModel({ trusted: false });
    model.fromJSON(outputs);
    const area = new OutputArea({ model, rendermime: this._rendermime });
    area.addClass('nbbgtask-outputs');
    this._area = area;
    Widget.attach(area, this._detail);
  }

  private _clearDetail(): void {
    if (this._area) {
      const model = this._area.model;
      if (this._area.isAttached) {
        Widget.detach(this._area);
      }
      this._area.dispose();
      model.dispose();
      this._area = null;
    }
    this._detail.textContent = '';
  }

  private _close(): void {
    window.clearInterval(this._timer);
    if (this._open) {
      this._buttons[this._open].classList.remove('nbbgtask-mod-open');
      this._buttons[this._open].removeAttribute('aria-pressed');
    }
    this._open = null;
    this._clearDetail();
    this._detail.hidden = true;
    delete this._detail.dataset.view;
    this._buttons.stack.disabled = this._task.state !== 'running';
  }

  private _task: ITaskRecord;
  private _model: TasksModel;
  private _rendermime: IRenderMimeRegistry;
  private _name = el('span', 'nbbgtask-name');
  private _state = el('span', 'nbbgtask-state');
  private _elapsed = el('span', 'nbbgtask-elapsed');
  private _bar = el('div', 'nbbgtask-bar');
  private _fill = el('div', 'nbbgtask-bar-fill');
  private _message = el('div', 'nbbgtask-message');
  private _resources = el('div', 'nbbgtask-resources');
  private _detail = el('div', 'nbbgtask-detail');
  private _buttons = {} as Record<Action, HTMLButtonElement>;
  private _open: Action | null = null;
  private _area: OutputArea | null = null;
  private _timer = 0;
}

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className = '',
  text = ''
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text) {
    node.textContent = text;
  }
  return node;
}

function option(value: string, label: string): HTMLOptionElement {
  const node = el('option', '', label);
  node.value = value;
  return node;
}

/** `ValueError: bad input`: the line of a traceback that says what went wrong. */
export function lastLine(text: string): string {
  const lines = text.trim().split('\n');
  return lines[lines.length - 1] ?? '';
}

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
