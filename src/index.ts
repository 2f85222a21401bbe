/**
 * The plugin: one tasks model for the page, the Tasks panel in the left area, its command, the
 * status-bar item and the notification when a task ends.
 */
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, Notification } from '@jupyterlab/apputils';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Widget } from '@lumino/widgets';

import { formatDuration, ITaskRecord, TasksModel } from './model';
import { lastLine, PANEL_ID, TasksPanel, tasksIcon } from './panel';

const PLUGIN_ID = 'nbbgtask:plugin';
const OPEN_COMMAND = 'nbbgtask:open-tasks';

/** The plugin's settings (schema/plugin.json). */
interface INotifySettings {
  notifyOn: 'all' | 'problems' | 'none';
  notifyMinSeconds: number;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description:
    'The tasks of the nbbgtask home: a panel, a status-bar item and a notification when one ends.',
  autoStart: true,
  requires: [IRenderMimeRegistry],
  optional: [ISettingRegistry, ICommandPalette, IStatusBar, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    rendermime: IRenderMimeRegistry,
    settingRegistry: ISettingRegistry | null,
    palette: ICommandPalette | null,
    statusBar: IStatusBar | null,
    restorer: ILayoutRestorer | null
  ) => {
    const model = new TasksModel(app.serviceManager.serverSettings);
    const panel = new TasksPanel({ model, rendermime });
    app.shell.add(panel, 'left', { rank: 700 });
    restorer?.add(panel, 'nbbgtask-tasks');

    app.commands.addCommand(OPEN_COMMAND, {
      label: 'Background Tasks',
      caption: 'Show the tasks of the nbbgtask home',
      icon: args => (args.isPalette ? undefined : tasksIcon),
      execute: () => {
        if (!panel.isAttached) {
          app.shell.add(panel, 'left', { rank: 700 });
        }
        app.shell.activateById(PANEL_ID);
      }
    });
    palette?.addItem({ command: OPEN_COMMAND, category: 'nbbgtask' });

    if (statusBar) {
      statusBar.registerStatusItem(`${PLUGIN_ID}-status`, {
        item: new RunningItem(model, () => app.commands.execute(OPEN_COMMAND)),
        align: 'left',
        rank: 50
      });
    }

    const notify: INotifySettings = { notifyOn: 'all', notifyMinSeconds: 30 };
    if (settingRegistry) {
      settingRegistry
        .load(PLUGIN_ID)
        .then(settings => {
          const read = () => {
            notify.notifyOn = settings.get('notifyOn')
              .composite as INotifySettings['notifyOn'];
            notify.notifyMinSeconds = Number(
              settings.get('notifyMinSeconds').composite
            );
          };
          read();
          settings.changed.connect(read);
        })
        .catch(reason =>
          console.warn(`nbbgtask: the settings did not load (${reason}); using the defaults`)
        );
    }
    model.taskEnded.connect((_, task) => {
      if (shouldNotify(task, notify, model)) {
        announce(task, model, () => app.commands.execute(OPEN_COMMAND));
      }
    });

    model.start();
  }
};

function shouldNotify(
  task: ITaskRecord,
  settings: INotifySettings,
  model: TasksModel
): boolean {
  if (settings.notifyOn === 'none') {
    return false;
  }
  if (settings.notifyOn === 'problems' && task.state !== 'failed' && task.state !== 'cancelled') {
    return false;
  }
  return (ranFor(task, model) ?? 0) >= settings.notifyMinSeconds;
}

function ranFor(task: ITaskRecord, model: TasksModel): number | null {
  if (task.elapsed !== null && task.elapsed !== undefined) {
    return task.elapsed;
  }
  if (task.started !== null && task.finished !== null) {
    return task.finished - task.started;
  }
  return model.elapsed(task);
}

/** `load completed in 2 min 3 s`, `load failed: ValueError: bad row`, `load was cancelled …`. */
export function endText(task: ITaskRecord, seconds: number | null): string {
  const took = formatDuration(seconds);
  switch (task.state) {
    case 'complete':
      return took ? `${task.name} completed in ${took}` : `${task.name} completed`;
    case 'failed':
      return task.error ? `${task.name} failed: ${lastLine(task.error)}` : `${task.name} failed`;
    case 'cancelled':
      return took ? `${task.name} was cancelled after ${took}` : `${task.name} was cancelled`;
    default:
      return `${task.name} is ${task.state}`;
  }
}

/** A JupyterLab toast, and a desktop notification where the user allowed them. */
function announce(task: ITaskRecord, model: TasksModel, open: () => void): void {
  const text = endText(task, ranFor(task, model));
  const options = {
    autoClose: task.state === 'failed' ? (false as const) : 10000,
    actions: [{ label: 'Show tasks', callback: open }]
  };
  const message = `nbbgtask: ${text}`;
  if (task.state === 'complete') {
    Notification.success(message, options);
  } else if (task.state === 'failed') {
    Notification.error(message, options);
  } else {
    Notification.warning(message, options);
  }
  const desktop = window.Notification;
  if (desktop && desktop.permission === 'granted') {
    try {
      const shown = new desktop('nbbgtask', { body: text, tag: `nbbgtask-${task.id}` });
      shown.onclick = () => {
        window.focus();
        open();
      };
    } catch (error) {
      // Some browsers allow notifications only from a service worker: the toast is enough.
      console.debug('nbbgtask: no desktop notification', error);
    }
  }
}

/** `2 running` in the status bar; a click opens the panel. */
class RunningItem extends Widget {
  constructor(model: TasksModel, open: () => void) {
    super();
    this._model = model;
    this.addClass('nbbgtask-StatusItem');
    this.addClass('jp-mod-highlighted');
    this.node.title = 'Background tasks (nbbgtask): click to show them';
    this.node.append(tasksIcon.element({ tag: 'span', className: 'nbbgtask-StatusItem-icon' }));
    this.node.append(this._text);
    this.node.addEventListener('click', open);
    model.changed.connect(this._update, this);
    this._update();
  }

  private _update(): void {
    const running = this._model.running;
    this._text.textContent = `${running} running`;
    this.node.dataset.running = String(running);
  }

  private _model: TasksModel;
  private _text = document.createElement('span');
}

export default plugin;
