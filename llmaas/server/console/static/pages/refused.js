import { start } from "../js/api.js";

start(async () => {});
